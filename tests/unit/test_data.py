"""The Arrow evaluation-set files: round trip and the bad files refused by name."""

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from raysoup.inputs.data import DataError, EvalSet, read_eval_set, write_eval_set


def test_arrow_round_trip(tmp_path):
    s = EvalSet("val", np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 1, 4, 3), np.array([3, 1]))
    write_eval_set(s, tmp_path / "val.arrow")
    back = read_eval_set(tmp_path / "val.arrow", num_classes=10)
    assert back.name == "val"
    np.testing.assert_array_equal(back.images, s.images)
    np.testing.assert_array_equal(back.labels, s.labels)


def test_labels_out_of_range_are_named(tmp_path):
    write_eval_set(
        EvalSet("id", np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 12])), tmp_path / "id.arrow"
    )
    with pytest.raises(DataError, match="label 12"):
        read_eval_set(tmp_path / "id.arrow", num_classes=10)


def test_empty_and_missing_eval_sets(tmp_path):
    write_eval_set(
        EvalSet("e", np.zeros((0, 1, 2, 2), np.uint8), np.zeros(0, np.int64)), tmp_path / "e.arrow"
    )
    with pytest.raises(DataError, match="empty"):
        read_eval_set(tmp_path / "e.arrow")
    with pytest.raises(DataError, match="nothing.arrow"):
        read_eval_set(tmp_path / "nothing.arrow")


def test_foreign_arrow_file_is_rejected(tmp_path):
    table = pa.table({"x": [1, 2]})
    with (
        pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    with pytest.raises(DataError, match="not a raysoup evaluation set"):
        read_eval_set(tmp_path / "f.arrow")
