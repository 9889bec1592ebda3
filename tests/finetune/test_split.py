"""Patient-level splits: reproducible, patient-disjoint, nested label fractions, clear errors."""

import pytest

from pcrlv2_fast.finetune.split import PAPER_FRACTIONS, labelled_count, make_split, parse_fraction


def _patients(n_patients: int, cases_per_patient: int = 2) -> dict[str, str]:
    return {f"p{p:03d}_scan{s}": f"p{p:03d}" for p in range(n_patients) for s in range(cases_per_patient)}


def test_split_is_reproducible_and_seed_dependent():
    cases = _patients(30)
    a, b = make_split(cases, seed=3, label_fraction=0.2), make_split(cases, seed=3, label_fraction=0.2)
    assert a == b
    assert make_split(cases, seed=4).test != a.test


def test_split_is_patient_disjoint_and_complete():
    cases = _patients(23, cases_per_patient=3)
    split = make_split(cases, seed=1, label_fraction=0.1)
    parts = [split.train, split.unlabelled, split.val, split.test]
    patient_sets = [{cases[c] for c in part} for part in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not patient_sets[i] & patient_sets[j]
    assert sorted(c for part in parts for c in part) == sorted(cases)
    # Every case of a patient goes with it.
    for part, patients in zip(parts, patient_sets):
        assert len(part) == 3 * len(patients)


def test_label_fractions_are_nested_and_leave_val_test_alone():
    cases = _patients(100, cases_per_patient=1)
    splits = {f: make_split(cases, seed=7, label_fraction=f) for f in PAPER_FRACTIONS}
    n_train = 100 - 20 - 20
    for f, split in splits.items():
        assert len(split.train) == labelled_count(n_train, f)
        assert split.val == splits[1.0].val and split.test == splits[1.0].test
    assert [len(splits[f].train) for f in PAPER_FRACTIONS] == [3, 6, 12, 60]
    ordered = [set(splits[f].train) for f in PAPER_FRACTIONS]
    assert all(small <= large for small, large in zip(ordered, ordered[1:]))


def test_at_least_one_labelled_patient_and_too_few_patients():
    split = make_split(_patients(3), seed=0, label_fraction=0.05)
    assert len({c.split("_")[0] for c in split.train}) == 1 and split.val and split.test
    with pytest.raises(ValueError, match="at least 3 patients"):
        make_split(_patients(2), seed=0)


@pytest.mark.parametrize(("text", "value"), [("0.05", 0.05), ("5%", 0.05), ("100%", 1.0), ("1", 1.0)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "1.5", "abc", "-5%", "nan"])
def test_parse_fraction_rejects(text):
    with pytest.raises(ValueError, match="label fraction"):
        parse_fraction(text)


def test_a_fixed_split_seed_keeps_the_test_set_and_varies_the_labelled_subset():
    patients = {f"c{i:03d}": f"p{i:03d}" for i in range(60)}
    runs = [make_split(patients, seed=0, val_fraction=0.1, test_fraction=0.3, label_fraction=0.25, subset_seed=s)
            for s in (0, 1, 2)]
    assert all(r.test == runs[0].test and r.val == runs[0].val for r in runs)
    assert len({r.train for r in runs}) == 3
    assert all(set(r.train) | set(r.unlabelled) == set(runs[0].train) | set(runs[0].unlabelled) for r in runs)
    # Without a subset seed, the split's seed draws both (as before); the record says which seed drew the subset.
    assert runs[0] == make_split(patients, seed=0, val_fraction=0.1, test_fraction=0.3, label_fraction=0.25)
    assert runs[0].subset_seed is None and runs[1].subset_seed == 1
    assert type(runs[1]).from_dict(runs[1].to_dict()) == runs[1]
