"""Unit tests for app.checkpoints: staging uploads and inspecting checkpoints.

A tiny GPT-2 is built and saved once per module; each test copies it and then breaks one thing.
Hostile uploads must fail with the right status and a useful message, and must leave nothing
behind: not outside ``dest`` (path traversal) and not inside it (partial uploads). The same
refusals through the HTTP API, with the error envelope and storage checked, are in
tests/e2e/test_hostile_input.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from app.checkpoints import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    CheckpointInfo,
    UploadLimits,
    inspect_checkpoint,
    stage_upload,
)
from app.config import Settings

LIMITS = UploadLimits(
    max_total_bytes=64 * 1024 * 1024,
    max_archive_members=16,
    max_compression_ratio=200.0,
    max_header_bytes=1024 * 1024,
    max_parameters=10_000_000,
)


def tiny_config(**overrides) -> GPT2Config:
    fields = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=128)
    fields.update(overrides)
    return GPT2Config(**fields)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, int]:
    """(folder save_pretrained wrote, parameter count with tied weights counted once)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, squeeze the model"] * 20, trainer=trainer)
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint, free to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(saved[0], folder)
    return folder


# --- helpers --------------------------------------------------------------------------------------


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def stage_fails(tmp_path: Path, files, limits: UploadLimits = LIMITS) -> CheckpointError:
    """Stage ``files`` expecting refusal; check nothing was written anywhere under tmp_path."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        stage_upload(files, dest, limits)
    assert tree(tmp_path) == before
    assert list(dest.iterdir()) == []
    assert caught.value.param == "files"
    return caught.value


def inspect_fails(folder: Path, limits: UploadLimits = LIMITS) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        inspect_checkpoint(folder, limits)
    assert caught.value.param == "files"
    return caught.value


def zip_bytes(members: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def folder_members(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def raw_safetensors(header: dict, data: bytes, *, header_length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return struct.pack("<Q", length) + encoded + data


def write_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- accepted uploads -----------------------------------------------------------------------------


def test_valid_folder_is_described_correctly(saved, ckpt):
    _, num_parameters = saved
    info = inspect_checkpoint(ckpt, LIMITS)

    assert isinstance(info, CheckpointInfo)
    assert (info.architecture, info.model_type) == ("GPT2LMHeadModel", "gpt2")
    assert info.num_parameters == num_parameters
    assert info.context_length == 128
    assert info.dtype == "float32"
    assert info.has_tokenizer is False
    names = sorted(p.name for p in ckpt.iterdir())
    assert [f["name"] for f in info.files] == names
    assert info.size_bytes == sum((ckpt / n).stat().st_size for n in names)
    for entry in info.files:
        assert entry["sha256"] == hashlib.sha256((ckpt / entry["name"]).read_bytes()).hexdigest()
        assert entry["size_bytes"] == (ckpt / entry["name"]).stat().st_size
    manifest = "".join(f"{f['sha256']}  {f['name']}\n" for f in info.files)
    assert info.sha256 == hashlib.sha256(manifest.encode()).hexdigest()


def test_limits_come_from_settings():
    settings = Settings(max_upload_bytes=123, max_archive_members=7, max_model_parameters=99)
    limits = UploadLimits.from_settings(settings)
    assert (limits.max_total_bytes, limits.max_archive_members, limits.max_parameters) == (
        123,
        7,
        99,
    )
    assert limits.max_header_bytes == settings.max_safetensors_header_bytes
    assert limits.max_compression_ratio == settings.max_compression_ratio


def test_multipart_files_are_staged_by_base_name(saved, tmp_path):
    dest = tmp_path / "dest"
    files = [(f"tiny-gpt2/{p.name}", io.BytesIO(p.read_bytes())) for p in saved[0].iterdir()]
    stage_upload(files, dest, LIMITS)
    assert tree(dest) == {p.name for p in saved[0].iterdir()}
    assert inspect_checkpoint(dest, LIMITS).sha256 == inspect_checkpoint(saved[0], LIMITS).sha256


@pytest.mark.parametrize("archive_name", ["tiny.zip", "tiny.tar.gz", "tiny.tgz", "tiny.tar"])
def test_archive_with_one_top_level_folder_is_accepted(saved, tmp_path, archive_name):
    members = folder_members(saved[0], prefix="tiny-gpt2/")
    if archive_name.endswith(".zip"):
        data = zip_bytes({"tiny-gpt2/": b"", **members})
    else:
        directory = tarfile.TarInfo("tiny-gpt2")
        directory.type = tarfile.DIRTYPE
        mode = "w" if archive_name.endswith(".tar") else "w:gz"
        data = tar_bytes([directory, *members.items()], mode=mode)
    dest = tmp_path / "dest"
    stage_upload([(archive_name, io.BytesIO(data))], dest, LIMITS)

    assert tree(dest) == {p.name for p in saved[0].iterdir()}  # archive itself removed
    info = inspect_checkpoint(dest, LIMITS)
    assert info.sha256 == inspect_checkpoint(saved[0], LIMITS).sha256
    assert info.num_parameters == saved[1]


def test_tokenizer_is_loaded_and_reported(ckpt, tokenizer_files):
    for path in tokenizer_files.iterdir():
        shutil.copy(path, ckpt / path.name)
    assert inspect_checkpoint(ckpt, LIMITS).has_tokenizer is True


def test_sharded_half_precision_checkpoint(tmp_path, saved):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).to(torch.float16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    info = inspect_checkpoint(tmp_path, LIMITS)
    assert info.num_parameters == saved[1]
    assert info.dtype == "float16"


FAMILIES = {
    "llama": dict(num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(num_key_value_heads=2, intermediate_size=64),
    "qwen2": dict(num_key_value_heads=2, intermediate_size=64),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=16),
    "gpt_bigcode": dict(),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_supported_family_is_accepted(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100)
    config = AutoConfig.for_model(model_type, **common, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    num_parameters = sum(p.numel() for p in model.parameters())
    # The early size estimate is a lower bound: a limit of exactly the real count passes.
    exact = UploadLimits(**{**LIMITS.__dict__, "max_parameters": num_parameters})
    info = inspect_checkpoint(tmp_path, exact)
    assert info.model_type == model_type and info.num_parameters == num_parameters
    assert info.architecture == type(model).__name__


def test_old_gpt2_names_without_prefix_are_accepted(ckpt, saved):
    tensors = load_file(ckpt / "model.safetensors")
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    save_file(renamed, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert inspect_checkpoint(ckpt, LIMITS).num_parameters == saved[1]


# --- hostile names and archives -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("conf\x00ig.json", "NUL"),
        ("config\x1b.json", "control"),
        ("dir\\config.json", "backslash"),
        ("", "empty"),
    ],
)
def test_bad_multipart_names(tmp_path, name, expected):
    error = stage_fails(tmp_path, [(name, io.BytesIO(b"{}"))])
    assert error.status_code == 400 and expected in error.message


@pytest.mark.parametrize(
    "member, expected",
    [
        ("../evil", "'..'"),
        ("tiny/../../evil", "'..'"),
        ("/tmp/squeeze-test-evil", "absolute"),
        ("config.json\x00.py", "NUL"),
        ("a/b/config.json", "nested"),
    ],
)
def test_bad_zip_member_names(tmp_path, member, expected):
    # zipfile will not write a NUL, so write a stand-in and patch the bytes afterwards.
    stand_in = member.replace("\x00", "X")
    data = zip_bytes({stand_in: b"{}"}).replace(stand_in.encode(), member.encode())
    error = stage_fails(tmp_path, [("up.zip", io.BytesIO(data))])
    assert error.status_code == 400 and expected in error.message
    assert not Path("/tmp/squeeze-test-evil").exists()


def test_members_in_different_folders_are_refused(tmp_path):
    data = zip_bytes({"a/config.json": b"{}", "b/model.safetensors": b"x"})
    error = stage_fails(tmp_path, [("up.zip", io.BytesIO(data))])
    assert "same folder" in error.message


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_tar_links_are_refused(tmp_path, kind):
    link = tarfile.TarInfo("config.json")
    link.type, link.linkname = kind, "/etc/passwd"
    error = stage_fails(tmp_path, [("up.tar.gz", io.BytesIO(tar_bytes([link])))])
    assert error.status_code == 400 and "link" in error.message


def test_tar_oversized_long_name_is_refused_before_it_is_read(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("x" * (2 * 1024 * 1024)))
    error = stage_fails(tmp_path, [("up.tgz", io.BytesIO(buffer.getvalue()))])
    assert "extended header" in error.message


def test_dot_prefixed_tar_and_macos_clutter_are_accepted(saved, tmp_path):
    members = list(folder_members(saved[0], prefix="./").items())
    members += [("./.DS_Store", b"junk"), ("__MACOSX/._config.json", b"junk")]
    dest = tmp_path / "dest"
    stage_upload([("up.tgz", io.BytesIO(tar_bytes(members)))], dest, LIMITS)
    assert tree(dest) == {p.name for p in saved[0].iterdir()}


def test_tar_device_and_fifo_are_refused(tmp_path):
    fifo = tarfile.TarInfo("config.json")
    fifo.type = tarfile.FIFOTYPE
    error = stage_fails(tmp_path, [("up.tar", io.BytesIO(tar_bytes([fifo], mode="w")))])
    assert "regular file" in error.message


def test_zip_symlink_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo("config.json")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    error = stage_fails(tmp_path, [("up.zip", io.BytesIO(buffer.getvalue()))])
    assert "link" in error.message


def test_duplicate_names_are_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf, pytest.warns(UserWarning):  # zipfile warns too
        zf.writestr("config.json", b"{}")
        zf.writestr("config.json", b"{}")
    error = stage_fails(tmp_path / "zip", [("up.zip", io.BytesIO(buffer.getvalue()))])
    assert "twice" in error.message
    # The same name in two folders of a multipart upload collapses to one base name.
    files = [("config.json", io.BytesIO(b"{}")), ("./config.json", io.BytesIO(b"{}"))]
    assert "twice" in stage_fails(tmp_path / "multi", files).message


def test_too_many_members(tmp_path):
    members = {f"shard-{i}.safetensors": b"x" for i in range(LIMITS.max_archive_members + 1)}
    error = stage_fails(tmp_path / "zip", [("up.zip", io.BytesIO(zip_bytes(members)))])
    assert error.status_code == 413 and "members" in error.message
    data = tar_bytes(list(members.items()))
    error = stage_fails(tmp_path / "tar", [("up.tgz", io.BytesIO(data))])
    assert error.status_code == 413 and "members" in error.message


def test_zip_bomb_is_refused(tmp_path):
    data = zip_bytes({"config.json": b"{}", "model.safetensors": bytes(8 * 1024 * 1024)})
    error = stage_fails(tmp_path, [("bomb.zip", io.BytesIO(data))])
    assert error.status_code == 413 and "zip bomb" in error.message


def test_tar_gz_bomb_is_refused(tmp_path):
    data = tar_bytes([("model.safetensors", bytes(8 * 1024 * 1024))])
    error = stage_fails(tmp_path, [("bomb.tar.gz", io.BytesIO(data))])
    assert error.status_code == 413 and "zip bomb" in error.message


def test_upload_over_the_byte_limit(tmp_path):
    small = UploadLimits(**{**LIMITS.__dict__, "max_total_bytes": 1000})
    files = [("config.json", io.BytesIO(b"{}")), ("model.safetensors", io.BytesIO(bytes(5000)))]
    error = stage_fails(tmp_path / "files", files, small)
    assert error.status_code == 413 and "limit" in error.message
    # Counted while extracting: a small tar.gz (not a bomb) whose content is over the limit.
    data = tar_bytes([("config.json", b"{}"), ("model.safetensors", bytes(range(256)) * 20)])
    assert len(data) < 2000
    archive_limit = UploadLimits(**{**LIMITS.__dict__, "max_total_bytes": 2000})
    error = stage_fails(tmp_path / "tar", [("up.tar.gz", io.BytesIO(data))], archive_limit)
    assert error.status_code == 413 and "limit" in error.message


def test_damaged_archive(tmp_path):
    error = stage_fails(tmp_path, [("up.tar.gz", io.BytesIO(b"not gzip at all"))])
    assert error.status_code == 400 and "tar" in error.message


# --- refused file kinds ---------------------------------------------------------------------------


def test_torch_zip_renamed_safetensors_is_refused(tmp_path, ckpt):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    error = stage_fails(tmp_path, [("model.safetensors", io.BytesIO(buffer.getvalue()))])
    assert "torch.save" in error.message
    (ckpt / "model.safetensors").write_bytes(buffer.getvalue())
    assert "torch.save" in inspect_fails(ckpt).message


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_pickle_renamed_safetensors_is_refused(tmp_path, ckpt, protocol):
    data = pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol)
    error = stage_fails(tmp_path, [("model.safetensors", io.BytesIO(data))])
    assert "pickle" in error.message
    (ckpt / "model.safetensors").write_bytes(data)
    assert "pickle" in inspect_fails(ckpt).message


def test_safetensors_whose_length_reads_like_a_pickle_is_judged_as_safetensors(tmp_path, ckpt):
    # A 640-byte header gives the length prefix 0x80 0x02, the first two bytes of a pickle.
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    data = struct.pack("<Q", 640) + header.encode().ljust(640) + bytes(8)
    assert data[:2] == b"\x80\x02"
    dest = tmp_path / "dest"
    stage_upload([("model.safetensors", io.BytesIO(data))], dest, LIMITS)
    assert (dest / "model.safetensors").read_bytes() == data
    (ckpt / "model.safetensors").write_bytes(data)
    error = inspect_fails(ckpt)  # a valid file, only not this model's weights
    assert "pickle" not in error.message and "the weights lack" in error.message


CONVERT = "safe_serialization=True"  # weights in another format: the message says how to convert


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pytorch_model.bin", ("pickle-based weights file", CONVERT)),
        ("weights.ckpt", ("pickle-based weights file", CONVERT)),
        ("model.h5", ("must be safetensors", CONVERT)),
        ("model.gguf", ("must be safetensors", CONVERT)),
        ("modeling_gpt2.py", ("never run",)),
        ("notes.txt", ("Allowed",)),
    ],
)
def test_refused_file_kinds_by_name(tmp_path, ckpt, name, expected):
    # Refused on the name alone, whatever the content, by staging and by inspection alike.
    error = stage_fails(tmp_path, [(name, io.BytesIO(b"x"))])
    assert error.status_code == 400 and all(phrase in error.message for phrase in expected)
    (ckpt / name).write_bytes(b"x")
    error = inspect_fails(ckpt)
    assert all(phrase in error.message for phrase in expected)


def test_symlink_in_folder_is_refused(ckpt):
    (ckpt / "README.md").symlink_to("/etc/passwd")
    assert "link" in inspect_fails(ckpt).message


# --- config.json ----------------------------------------------------------------------------------


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json is missing" in inspect_fails(ckpt).message


def test_config_must_be_a_json_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    assert "JSON object" in inspect_fails(ckpt).message
    (ckpt / "config.json").write_text('{"model_type": "gpt2", "model_type": "llama"}')
    assert "duplicate key" in inspect_fails(ckpt).message


@pytest.mark.parametrize(
    "key, value",
    [("auto_map", {"AutoModelForCausalLM": "modeling.Evil"}), ("trust_remote_code", True)],
)
def test_remote_code_keys_are_refused(ckpt, key, value):
    write_config(ckpt, **{key: value})
    error = inspect_fails(ckpt)
    assert error.status_code == 400 and key in error.message and "never run" in error.message


@pytest.mark.parametrize(
    "key, value",
    [
        ("attn_implementation", "kernels-community/flash-attn"),
        ("_attn_implementation", "flash_attention_2"),
        ("experts_implementation", "grouped_mm"),
        ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}),
        ("quantization_config", {"quant_method": "compressed-tensors", "format": "int-quantized"}),
        ("tokenizer_class", "GPT2Tokenizer"),
        ("custom_pipelines", {"text-generation": {"impl": "pipe.Evil"}}),
        ("base_model_tp_plan", {"h.*.attn.c_attn": "colwise"}),
    ],
)
def test_loading_directives_in_config_are_refused_naming_the_field(ckpt, key, value):
    # Fields that choose how transformers loads (kernels, quantizer, classes): the worker's
    # choice, never the upload's.
    write_config(ckpt, **{key: value})
    error = inspect_fails(ckpt)
    assert error.status_code == 422, error.message
    assert error.message.startswith(f"config.json: {key} ") and f"remove {key!r}" in error.message


def test_every_refused_loading_directive_is_one_transformers_reads():
    # The table names real fields: each is an init argument or attribute transformers' config
    # (or its loading code) knows, so a rename upstream shows up here.
    import inspect as inspect_module

    from transformers import PretrainedConfig

    from app.checkpoints.model_config import LOADING_DIRECTIVES

    import transformers.modeling_utils as modeling_utils
    import transformers.models.auto.tokenization_auto as tokenization_auto
    import transformers.pipelines as pipelines

    known = "".join(inspect_module.getsource(m) for m in (
        transformers.configuration_utils, modeling_utils, tokenization_auto, pipelines))
    for key in LOADING_DIRECTIVES:
        assert key in known or hasattr(PretrainedConfig, key), key


def test_a_plain_save_pretrained_config_carries_no_loading_directive(saved):
    from app.checkpoints.model_config import LOADING_DIRECTIVES

    folder, _ = saved
    assert not set(json.loads((folder / "config.json").read_text())) & set(LOADING_DIRECTIVES)


def test_auto_map_in_tokenizer_config_is_refused(ckpt, tokenizer_files):
    for path in tokenizer_files.iterdir():
        shutil.copy(path, ckpt / path.name)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tok.Evil", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert "auto_map" in inspect_fails(ckpt).message


def test_unsupported_model_type(ckpt):
    assert "gpt2" in SUPPORTED_MODEL_TYPES and "bert" not in SUPPORTED_MODEL_TYPES
    write_config(ckpt, model_type="bert", architectures=["BertForMaskedLM"])
    error = inspect_fails(ckpt)
    assert "'bert' is not supported" in error.message and "llama" in error.message


def test_non_causal_architecture(ckpt):
    write_config(ckpt, architectures=["GPT2ForSequenceClassification"])
    assert "not a causal" in inspect_fails(ckpt).message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"n_layer": 10**6}, "n_layer"),
        ({"n_embd": 10**7}, "n_embd"),
        ({"vocab_size": 10**9}, "vocab_size"),
        ({"n_head": 0}, "n_head"),
        ({"n_head": 5}, "not divisible"),
        ({"n_layer": "2"}, "integer"),
    ],
)
def test_absurd_config_sizes(ckpt, changes, expected):
    write_config(ckpt, **changes)
    error = inspect_fails(ckpt)
    assert error.status_code == 400 and expected in error.message


def test_trillion_parameter_config_is_refused_without_building_it(ckpt, monkeypatch):
    # Within every per-field bound, but about 10**12 parameters in all.
    write_config(ckpt, n_layer=1024, n_embd=16384, n_head=128, vocab_size=1_000_000)
    built = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_config", lambda *args, **kw: built.append(args)
    )
    error = inspect_fails(ckpt, UploadLimits(**{**LIMITS.__dict__, "max_parameters": 10**12}))
    assert "at least" in error.message and "limit" in error.message
    assert built == []  # refused on the estimate, not even the meta skeleton was built


def test_parameter_limit(ckpt):
    error = inspect_fails(ckpt, UploadLimits(**{**LIMITS.__dict__, "max_parameters": 1000}))
    assert "limit of 1,000" in error.message


# --- safetensors headers and tensors --------------------------------------------------------------


def test_header_length_beyond_file(ckpt):
    data = raw_safetensors({}, b"", header_length=10**5)
    (ckpt / "model.safetensors").write_bytes(data)
    error = inspect_fails(ckpt)
    assert error.status_code == 400 and "runs past the end" in error.message


def test_huge_header_is_refused_by_limit(ckpt):
    small = UploadLimits(**{**LIMITS.__dict__, "max_header_bytes": 100})
    error = inspect_fails(ckpt, small)
    assert error.status_code == 413 and "over the limit" in error.message


@pytest.mark.parametrize(
    "header, data, expected",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "outside"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            bytes(12),
            "after the last",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "unused bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    ],
)
def test_bad_safetensors_layouts(ckpt, header, data, expected):
    (ckpt / "model.safetensors").write_bytes(raw_safetensors(header, data))
    error = inspect_fails(ckpt)
    assert error.status_code == 400 and expected in error.message


def test_shape_mismatch_with_config(ckpt):
    write_config(ckpt, n_embd=32)
    error = inspect_fails(ckpt)
    assert (
        "shapes config.json describes" in error.message
        and "transformer.wte.weight" in error.message
    )


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    error = inspect_fails(ckpt)
    assert "lack 1 tensors" in error.message and "transformer.ln_f.bias" in error.message


def test_untied_head_must_be_stored(tmp_path):
    GPT2LMHeadModel(tiny_config(tie_word_embeddings=False)).save_pretrained(tmp_path)
    inspect_checkpoint(tmp_path, LIMITS)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "lm_head.weight" in inspect_fails(tmp_path).message


def test_several_weight_files_need_an_index(ckpt):
    shutil.copy(ckpt / "model.safetensors", ckpt / "model-00002-of-00002.safetensors")
    assert "index" in inspect_fails(ckpt).message


def test_index_must_match_the_shards(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in tensors}}
    index["weight_map"]["transformer.wpe.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "not in the upload" in inspect_fails(ckpt).message


def test_duplicate_tensor_across_shards(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    save_file(
        {"transformer.wpe.weight": tensors["transformer.wpe.weight"]}, ckpt / "extra.safetensors"
    )
    weight_map = {name: "model.safetensors" for name in tensors}
    index = {"weight_map": weight_map | {"transformer.ln_f.bias": "extra.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "stored in both" in inspect_fails(ckpt).message


def test_broken_tokenizer_is_refused(ckpt):
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    error = inspect_fails(ckpt)
    assert "tokenizer files do not load" in error.message


def test_tokenizer_config_without_vocabulary_is_refused(ckpt):
    (ckpt / "tokenizer_config.json").write_text("{}")
    assert "no vocabulary" in inspect_fails(ckpt).message
