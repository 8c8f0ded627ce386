"""Labels CSV validation: every problem reported with the file and line, before any training."""

from __future__ import annotations

import pytest

from manifests.cache import FAILED, VideoRecord
from pipeline.labels import LabelError, check_against_cache, read_labels
from tests.synthetic import write_labels, write_synthetic_cache


def write(tmp_path, text: str, name: str = "labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_scores_splits_and_line_numbers(tmp_path):
    path = write(tmp_path, "video_id,score,split\na,1.5,train\n\nb,2,VAL\nc,3e1,test\n")
    labels = read_labels(path)
    assert labels.scores == {"a": 1.5, "b": 2.0, "c": 30.0}
    assert labels.splits == {"a": "train", "b": "val", "c": "test"}
    assert labels.lines == {"a": 2, "b": 4, "c": 5}
    assert labels.ids_in_split("train", "val") == ["a", "b"]
    assert labels.where("c") == f"{path} line 5"


def test_without_split_column_every_row_is_usable(tmp_path):
    labels = read_labels(write(tmp_path, "score,video_id,judge\n7,x,anna\n8,y,bob\n"))
    assert labels.splits is None and labels.ids_in_split("test") == ["x", "y"]
    assert labels.extra_columns == ["judge"]


def test_missing_column_names_the_header_line(tmp_path):
    with pytest.raises(LabelError, match=r"line 1: .*lacks column\(s\) \['score'\]"):
        read_labels(write(tmp_path, "video_id,points\na,1\n"))


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    text = (
        "video_id,score,split\n"
        "a,1,train\n"  # 2 ok
        "b,abc,train\n"  # 3 not a number
        "c,nan,train\n"  # 4 not finite
        "d,inf,train\n"  # 5 not finite
        "a,2,train\n"  # 6 duplicate of line 2
        "e,3,holdout\n"  # 7 bad split
        ",4,train\n"  # 8 empty id
        "f\n"  # 9 too few fields
    )
    path = write(tmp_path, text)
    with pytest.raises(LabelError) as caught:
        read_labels(path)
    message = str(caught.value)
    assert str(path) in message and "7 problem(s)" in message
    for expected in (
        "line 3: score 'abc' of 'b' is not a number",
        "line 4: score 'nan' of 'c' is not finite",
        "line 5: score 'inf' of 'd' is not finite",
        "line 6: duplicate video_id 'a' (first on line 2)",
        "line 7: split 'holdout'",
        "line 8: empty video_id",
        "line 9: 1 field(s)",
    ):
        assert expected in message


def test_empty_files_and_missing_files(tmp_path):
    with pytest.raises(LabelError, match="is empty"):
        read_labels(write(tmp_path, ""))
    with pytest.raises(LabelError, match="no labelled videos"):
        read_labels(write(tmp_path, "video_id,score\n", "header_only.csv"))
    with pytest.raises(LabelError, match="cannot read labels file"):
        read_labels(tmp_path / "nope.csv")


@pytest.fixture()
def small_cache(tmp_path):
    made = write_synthetic_cache(tmp_path / "cache", num_videos=5, absent={"vid001": ["audio"]})
    return made


def test_cache_match_gives_present_modalities(tmp_path, small_cache):
    labels = read_labels(write_labels(tmp_path / "l.csv", small_cache.scores))
    present = check_against_cache(labels, small_cache.cache)
    assert present["vid000"] == ["rgb", "flow", "audio"]
    assert present["vid001"] == ["rgb", "flow"]


def test_ids_without_features_name_their_lines(tmp_path, small_cache):
    record = small_cache.cache.read_record("vid002")
    small_cache.cache.write_record(VideoRecord(**{**record.__dict__, "status": FAILED, "error": "decode error"}))
    scores = {**small_cache.scores, "ghost": 1.0}
    labels = read_labels(write_labels(tmp_path / "l.csv", scores))
    with pytest.raises(LabelError) as caught:
        check_against_cache(labels, small_cache.cache)
    message = str(caught.value)
    assert "line 7: video 'ghost' has no features" in message
    assert "line 4: video 'vid002' failed extraction (decode error)" in message


def test_features_without_labels_is_an_error_unless_ignored(tmp_path, small_cache):
    scores = {k: v for k, v in small_cache.scores.items() if k not in ("vid003", "vid004")}
    labels = read_labels(write_labels(tmp_path / "l.csv", scores))
    with pytest.raises(LabelError, match=r"2 video\(s\) in the feature cache .* have no label \('vid003', 'vid004'\)"):
        check_against_cache(labels, small_cache.cache)
    assert set(check_against_cache(labels, small_cache.cache, require_all_labelled=False)) == set(scores)


def test_one_pass_finds_every_problem_of_a_row(tmp_path):
    # a bad score does not hide the duplicate id of the same row, nor its bad split
    path = write(tmp_path, "video_id,score,split\nvid1,7,train\nvid1,seven,later\n")
    with pytest.raises(LabelError) as caught:
        read_labels(path)
    message = str(caught.value)
    assert "3 problem(s)" in message
    for expected in ("line 3: duplicate video_id 'vid1' (first on line 2)", "line 3: score 'seven'", "line 3: split 'later'"):
        assert expected in message


def test_problems_are_capped_with_a_count(tmp_path):
    rows = "".join(f"v{i},x\n" for i in range(25))
    with pytest.raises(LabelError) as caught:
        read_labels(write(tmp_path, "video_id,score\n" + rows))
    message = str(caught.value)
    assert "25 problem(s)" in message and "... and 15 more" in message and "line 26" not in message


def test_more_fields_than_the_header_is_an_error_naming_the_line(tmp_path):
    with pytest.raises(LabelError, match=r"line 3: 3 field\(s\), the header has 2 \(a decimal comma\?"):
        read_labels(write(tmp_path, "video_id,score\nvid001,7.5\nvid003,7,5\n"))


def test_ids_are_kept_exactly_spaces_included(tmp_path, small_cache):
    labels = read_labels(write(tmp_path, 'video_id,score\n" space ",3\nvid002 ,4\n'))
    assert labels.video_ids == [" space ", "vid002 "]


def test_unknown_id_gets_the_closest_known_one(tmp_path, small_cache):
    labels = read_labels(write(tmp_path, "video_id,score\nvid000,1\nvid01,2\n"))
    with pytest.raises(LabelError, match=r"line 3: video 'vid01' has no features .*; did you mean 'vid001'\?"):
        check_against_cache(labels, small_cache.cache, require_all_labelled=False)


def test_undecodable_files_are_named(tmp_path, clip_folder):
    utf16 = tmp_path / "excel.csv"
    utf16.write_text("video_id,score\nvid000,1\n", encoding="utf-16")
    with pytest.raises(LabelError, match=rf"{utf16} is UTF-16 text"):
        read_labels(utf16)
    with pytest.raises(LabelError, match=r"good.mp4 is not a text file \(binary content: a video"):
        read_labels(clip_folder / "good.mp4")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("video_id,score\nvid000,1\nvid\xe9,2\n".encode("latin-1"))
    with pytest.raises(LabelError, match=rf"{latin} line 3: byte 0xe9 is not UTF-8"):
        read_labels(latin)


def test_ids_escaped_for_spreadsheets_read_back_exactly(tmp_path):
    """A labels file the project wrote (import-features) escapes ids a spreadsheet would run as formulas
    with a leading single quote; the reader undoes exactly that and nothing else."""
    path = write(tmp_path, "video_id,score\n'=1+2,1\n\"'+SUM(1,2)\",2\n''@cmd,3\n'plain,4\n-3,-5\n")
    assert read_labels(path).scores == {"=1+2": 1.0, "+SUM(1,2)": 2.0, "'@cmd": 3.0, "'plain": 4.0, "-3": -5.0}


def test_unknown_columns_are_named_in_one_warning_line(tmp_path, capsys):
    path = write(tmp_path, "video_id,score,judge_notes,split,panel\na,1.5,fine,train,2\n")
    labels = read_labels(path)
    assert labels.scores == {"a": 1.5} and labels.splits == {"a": "train"}
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(path) in err and "judge_notes, panel" in err, err
    read_labels(path)  # read again in the same command (reproduce: once per seed): said once
    read_labels(write(tmp_path, "video_id,score\na,1\n", "plain.csv"))
    assert capsys.readouterr().err == ""
