"""The command line as users run it: generate (text, ids, files, chat template, JSON) and chat."""

import io
import json

import pytest

from jaxinfer.cli import main
from jaxinfer.generate import generate
from jaxinfer.loading.loader import load_model
from tests.server_fixtures import write_checkpoint

SMALL = ["--num-pages", "96", "--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--page-size", "8",
         "--max-model-len", "128"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli_ckpt"), seed=3)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint))


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_token_ids_json_matches_reference(checkpoint, loaded, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(checkpoint), *SMALL, "--prompt-token-ids", "5,6,7,8",
                           "--max-tokens", "12", "--json")
    assert code == 0
    record = json.loads(out)
    [ref] = generate(loaded, [[5, 6, 7, 8]], 12, eos_token_ids=loaded.tokenizer.eos_token_ids)
    assert record["prompt_token_ids"] == [5, 6, 7, 8] and record["token_ids"] == ref
    assert record["text"] == loaded.tokenizer.decode(ref) and record["finish_reason"] in ("stop", "length")


def test_chat_prompt_uses_the_template(checkpoint, loaded, capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", str(checkpoint), *SMALL, "--chat", "--prompt", "Hello there",
                           "--max-tokens", "6", "--json")
    record = json.loads(out)
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert code == 0 and record["prompt"] == text
    assert record["prompt_token_ids"] == loaded.tokenizer.encode(text, add_special_tokens=False)


def test_prompts_file_and_n(checkpoint, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text('The quick brown fox\n\n{"prompt_token_ids": [9, 10, 11]}\nParis is\n')
    code, out, _ = run_cli(capsys, "generate", "--model", str(checkpoint), *SMALL, "--prompts-file", str(f),
                           "--max-tokens", "4", "--n", "2", "--temperature", "0.8", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(records) == 6
    assert [r["index"] for r in records] == [0, 1] * 3
    assert records[2]["prompt_token_ids"] == [9, 10, 11]


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
])
def test_bad_sampling_flags(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", "--model", str(checkpoint), *SMALL, *args])


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "error:" in err and "nowhere" in err


def test_interactive_chat_streams_replies(checkpoint, loaded, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nWhat is the capital of France?\n/exit\n"))
    code, out, _ = run_cli(capsys, "chat", "--model", str(checkpoint), *SMALL, "--max-tokens", "5")
    replies = out.splitlines()
    assert code == 0 and len(replies) == 2
    # The first reply is the greedy continuation of the templated first turn.
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    [ref] = generate(loaded, [ids], 5, eos_token_ids=loaded.tokenizer.eos_token_ids)
    eos = set(loaded.tokenizer.eos_token_ids)
    assert replies[0] == loaded.tokenizer.decode([t for t in ref if t not in eos])


def test_yaml_config_sets_defaults_and_flags_win(checkpoint, tmp_path, capsys):
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(f"model: {checkpoint}\nnum_pages: 96\nmax_num_batched_tokens: 32\nmax_model_len: 128\n"
                   "page_size: 8\nmax_tokens: 3\n")
    code, out, _ = run_cli(capsys, "generate", "--config", str(cfg), "--prompt-token-ids", "5,6", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 3
    code, out, _ = run_cli(capsys, "generate", "--config", str(cfg), "--prompt-token-ids", "5,6", "--json",
                           "--max-tokens", "5")
    assert len(json.loads(out)["token_ids"]) == 5
    cfg.write_text("no_such_setting: 1\n")
    with pytest.raises(SystemExit, match="unknown settings"):
        main(["generate", "--config", str(cfg)])


@pytest.mark.parametrize("name", ["smollm2-cpu.yaml", "llama3-8b-h100.yaml"])
def test_shipped_configs_use_known_settings(name):
    from pathlib import Path

    from jaxinfer.cli import _read_config, build_parser

    generate_parser = build_parser().parse_args(["generate"]).subparser
    assert _read_config(str(Path(__file__).parent.parent / "configs" / name), generate_parser)


def test_quantization_and_kv_cache_flags_reach_the_engine_config():
    from jaxinfer.cli import build_parser, engine_config_kwargs
    from jaxinfer.engine.config import EngineConfig

    args = build_parser().parse_args(["generate", "--quantization", "int4", "--quantization-group-size", "64",
                                      "--kv-cache-dtype", "fp8"])
    config = EngineConfig(**engine_config_kwargs(args))
    assert (config.quantization, config.quantization_group_size, config.kv_cache_dtype) == ("int4", 64, "fp8")
    defaults = EngineConfig(**engine_config_kwargs(build_parser().parse_args(["generate"])))
    assert (defaults.quantization, defaults.kv_cache_dtype) == (None, "auto")
