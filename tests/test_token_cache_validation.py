"""A token cache whose header lies about its arrays is refused when opened, with one line naming the field
(issue 15, item 5): never a raw traceback, never silent training on the wrong grids."""
import json
import shutil

import numpy as np
import pytest

from arvision.cli import main
from arvision.data.token_cache import TokenCache


@pytest.fixture(scope="module")
def good_cache(vq_token_cache):
    return vq_token_cache


def _copy(good_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    return cache


def _edit_header(cache, **changes):
    header = json.loads((cache / "header.json").read_text())
    header.update(changes)
    (cache / "header.json").write_text(json.dumps(header))


def _rewrite(cache, name, fn):
    arr = np.array(np.load(cache / name))
    np.save(cache / name, fn(arr))


def _refused(cache, capsys, field):
    with pytest.raises(ValueError) as e:
        TokenCache(cache)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and str(cache) in msg, msg
    # the same through the command line: one line, nothing created
    out = cache.parent / "run"
    with pytest.raises(SystemExit):
        main(["heptapod", "train", "--data", str(cache), "--out", str(out), "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("arvision: error:") and "\n" not in err and field in err, err
    assert not out.exists()
    return msg


def test_honest_cache_opens(good_cache):
    cache = TokenCache(good_cache)
    assert len(cache) == 24 and cache.info["grid_size"] == 8


@pytest.mark.parametrize("grid", [4, 16])
def test_grid_size_that_disagrees_with_tokens_is_refused(good_cache, tmp_path, capsys, grid):
    cache = _copy(good_cache, tmp_path)
    _edit_header(cache, grid_size=grid)
    _refused(cache, capsys, "grid_size")


def test_codebook_smaller_than_the_codes_is_refused(good_cache, tmp_path, capsys):
    cache = _copy(good_cache, tmp_path)
    assert int(np.load(cache / "tokens.npy").max()) >= 16
    _edit_header(cache, codebook_size=16)
    _refused(cache, capsys, "codebook_size")


def test_continuous_token_type_over_codes_is_refused(good_cache, tmp_path, capsys):
    cache = _copy(good_cache, tmp_path)
    _edit_header(cache, token_type="continuous")
    _refused(cache, capsys, "token_type")


def test_longer_valid_array_is_refused(good_cache, tmp_path, capsys):
    cache = _copy(good_cache, tmp_path)
    _rewrite(cache, "valid.npy", lambda v: np.concatenate([v, np.ones(8, np.uint8)]))
    _refused(cache, capsys, "valid.npy")


def test_labels_outside_the_class_list_are_refused(good_cache, tmp_path, capsys):
    cache = _copy(good_cache, tmp_path)
    _rewrite(cache, "labels.npy", lambda v: np.where(np.arange(len(v)) == 3, 10, v))
    _refused(cache, capsys, "labels.npy")


def test_complete_flag_with_fewer_rows_encoded_is_refused(good_cache, tmp_path, capsys):
    # an encode interrupted after 8 of 24 images, its header then edited to say complete
    cache = _copy(good_cache, tmp_path)
    _rewrite(cache, "valid.npy", lambda v: np.where(np.arange(len(v)) < 8, v, 0).astype(np.uint8))
    _rewrite(cache, "tokens.npy", lambda t: np.where(np.arange(len(t))[:, None, None] < 8, t, 0).astype(t.dtype))
    _edit_header(cache, encoded=8, complete=True)
    _refused(cache, capsys, "encoded")
    # and when `encoded` lies too, the unencoded rows are more than the skipped count
    _edit_header(cache, encoded=24)
    _refused(cache, capsys, "skipped")


def test_damaged_header_json_is_one_line(good_cache, tmp_path, capsys):
    cache = _copy(good_cache, tmp_path)
    (cache / "header.json").write_text('{"format": "arvision-token-cache", "grid_')
    _refused(cache, capsys, "header.json")
