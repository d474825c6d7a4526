"""Where outputs go: the one rule for -o (a file for one input, else a folder) shared by icd edit and icd invert,
and default names that never land on an input or a file icd did not make."""

import pytest

from icdcli.core.errors import ICDError, ICDUsageError
from icdcli.run.batch import Item
from icdcli.run.planning import output_target, plan_edit_outputs, plan_files


def _item(path):
    return Item(str(path), str(path), image=path, relative=path.relative_to(path.parent), src="s", tgt="t")


def test_o_is_a_file_for_one_input_and_a_folder_otherwise(tmp_path):
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"")
    assert output_target(str(tmp_path / "out.png"), [photo], single=True) == (tmp_path / "out.png", True)
    assert output_target(str(tmp_path / "made") + "/", [photo], single=True) == (tmp_path / "made", False)
    assert (tmp_path / "made").is_dir()
    assert output_target(str(tmp_path / "many"), [photo], single=False) == (tmp_path / "many", False)
    with pytest.raises(ICDUsageError, match="is one of the inputs"):  # the command line's usage error (exit 2)
        output_target(str(photo), [photo], single=True)
    with pytest.raises(ICDError, match="neither does its parent"):
        output_target(str(tmp_path / "no" / "where") + "/", [photo], single=True)
    with pytest.raises(ICDError, match=r"output folder .*cat.png/sub cannot be made: .*cat.png is a file"):
        output_target(str(photo / "sub") + "/", [photo], single=False)


@pytest.mark.parametrize("name", ["edited.png", "edited.JPG", "latents.safetensors"])
def test_several_outputs_refuse_an_o_named_like_a_file_unless_it_ends_in_a_separator(tmp_path, name):
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"")
    with pytest.raises(ICDUsageError, match=f"-o {tmp_path / name} names a file, but there are several outputs"):
        output_target(str(tmp_path / name), [photo], single=False)
    assert not (tmp_path / name).exists()  # no folder named like a file
    assert output_target(str(tmp_path / name) + "/", [photo], single=False) == (tmp_path / name, False)
    assert output_target(str(tmp_path / name), [photo], single=False) == (tmp_path / name, False)  # exists now


def test_edit_and_invert_plan_with_the_same_rule(tmp_path):
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"")
    for output in (str(photo), str(tmp_path / "missing" / "deeper") + "/"):
        with pytest.raises(ICDError) as from_edit:
            plan_edit_outputs([_item(photo)], output, spec=None, batch=False)
        with pytest.raises(ICDError) as from_invert:
            plan_files([photo], output, suffix=".latent.safetensors")
        assert str(from_edit.value) == str(from_invert.value)
    (edited,) = plan_edit_outputs([_item(photo)], str(tmp_path / "out") + "/", spec=None, batch=False)
    assert edited.output == tmp_path / "out" / "cat-edit.png"
    assert plan_files([photo], str(tmp_path / "out"), suffix=".latent.safetensors") == [
        tmp_path / "out" / "cat.latent.safetensors"
    ]


def test_a_default_name_never_replaces_a_file_icd_did_not_make(tmp_path):
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"")
    (tmp_path / "cat-reconstruction.png").write_bytes(b"not icd's")
    assert plan_files([photo], None, suffix="-reconstruction.png") == [tmp_path / "cat-reconstruction-1.png"]
    assert plan_files([photo], None, suffix=".png") == [tmp_path / "cat-1.png"]  # never the input itself
