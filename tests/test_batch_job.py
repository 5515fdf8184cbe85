"""`jaxinfer batch`: OpenAI batch files through the engine, checked against the offline
`LLM.generate`/`LLM.chat`; per-line errors; a job killed part way (a real SIGKILL) and an output
ending in a torn line both resume to every custom_id exactly once."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxinfer.batch_io import BatchFileError, ResultFile, read_requests
from jaxinfer.batch_job import BatchRunner, run_batch_job
from jaxinfer.cli import main
from jaxinfer.sampling_params import SamplingParams
from tests.server_fixtures import write_checkpoint

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, num_pages=96)
ENGINE_FLAGS = ["--max-model-len", "128", "--max-num-batched-tokens", "32", "--page-size", "8", "--num-pages", "96"]
TEXTS = ["The quick brown fox", "Paris is the capital", "Once upon a time", "Streaming responses arrive",
         "Numbers like 1234", "Berlin is", "a small model", "server-sent events"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital city."}]


def completion_line(custom_id, prompt, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, "temperature": 0, **body}}


def chat_line(custom_id, messages, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": messages, "temperature": 0, **body}}


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_results(path: Path) -> dict:
    """custom_id -> result line; fails on a repeated custom_id."""
    results = {}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        assert record["custom_id"] not in results, f"{record['custom_id']} appears twice"
        results[record["custom_id"]] = record
    return results


def batch_args(model, inp, out, **extra):
    return argparse.Namespace(model=str(model), input=str(inp), output=str(out), served_model_name=None,
                              enable_auto_tool_choice=False, tool_call_parser=None, **extra)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("batch_ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from jaxinfer.llm import LLM

    return LLM(str(checkpoint), compilation_cache_dir="", warmup=False, **ENGINE)


def offline_text(llm, prompt, **params) -> str:
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, **params), use_tqdm=False)
    return out.outputs[0].text


# -- the files, without a model --------------------------------------------------------------
def test_bad_input_lines_and_duplicate_ids_are_refused_up_front(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        completion_line("a", "x"), "{not json", "[1, 2]", {"method": "POST"}, completion_line("b", "y"), "",
        completion_line("a", "z")])
    with pytest.raises(BatchFileError) as e:
        read_requests(str(inp))
    message = str(e.value)
    assert "4 line(s)" in message and "line 2: invalid JSON" in message and "line 3: must be a JSON object" in message
    assert "line 4: custom_id must be a non-empty string" in message
    assert "line 7: custom_id 'a' is already used on line 1" in message
    # The command stops before loading anything: the model does not even exist.
    with pytest.raises(SystemExit, match="already used on line 1"):
        main(["batch", "--model", str(tmp_path / "no-model"), "-i", str(inp), "-o", str(tmp_path / "out.jsonl")])


def test_result_file_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = [json.dumps({"custom_id": c, "response": None, "error": None}) + "\n" for c in ("a", "b")]
    path.write_text("".join(good) + '{"custom_id": "c", "resp')
    with ResultFile(str(path)) as results:
        assert set(results.done) == {"a", "b"} and results.torn_bytes == len('{"custom_id": "c", "resp')
        with pytest.raises(BatchFileError, match="another batch job"):
            ResultFile(str(path))  # the lock keeps a second job out
        results.append({"custom_id": "c", "text": "line\nbreak \u2028"})
    assert path.read_text() == "".join(good) + json.dumps({"custom_id": "c", "text": "line\nbreak \u2028"},
                                                          ensure_ascii=False) + "\n"
    # A bad line before the last is not a torn write: the file is refused and left as it is.
    corrupt = "".join(good[:1]) + "garbage\n" + good[1]
    path.write_text(corrupt)
    with pytest.raises(BatchFileError, match=":2: is not a batch result line"):
        ResultFile(str(path))
    assert path.read_text() == corrupt


def test_output_of_another_batch_and_finished_jobs_need_no_model(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line("a", "x")])
    out = write_jsonl(tmp_path / "out.jsonl", [{"custom_id": "a", "response": None, "error": None}])

    def no_engine():
        raise AssertionError("the engine was built")

    assert run_batch_job(batch_args("m", inp, out), no_engine) == 0
    assert "nothing left to run" in capsys.readouterr().err
    write_jsonl(out, [{"custom_id": "zz", "response": None, "error": None}])
    with pytest.raises(SystemExit, match="custom_id\\(s\\) that are not in"):
        run_batch_job(batch_args("m", inp, out), no_engine)


# -- through the engine ----------------------------------------------------------------------
def test_completions_and_chat_equal_offline_generate(llm, tmp_path):
    lines = [completion_line("text", TEXTS[0], max_tokens=12),
             completion_line("ids", [[5, 6, 7, 8], [9, 10, 11]], max_tokens=6),
             completion_line("echo", TEXTS[2], max_tokens=5, echo=True, stop=["e"]),
             chat_line("chat", CHAT, max_completion_tokens=10),
             chat_line("chat-ids-n2", CHAT[1:], max_tokens=6, n=2, temperature=0.9, seed=7)]
    with ResultFile(str(tmp_path / "out.jsonl")) as results:
        stats = BatchRunner(llm.engine, ("tiny",), results).run(read_requests(str(write_jsonl(tmp_path / "in.jsonl",
                                                                                               lines))))
    got = read_results(tmp_path / "out.jsonl")
    assert set(got) == {line["custom_id"] for line in lines} and stats.succeeded == 5 and stats.failed == 0
    for record in got.values():
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200 and record["response"]["request_id"].startswith("req_")
    text = got["text"]["response"]["body"]
    assert text["object"] == "text_completion" and text["model"] == "tiny"
    assert text["choices"][0]["text"] == offline_text(llm, TEXTS[0], max_tokens=12)
    ids = got["ids"]["response"]["body"]
    assert [c["text"] for c in ids["choices"]] == [offline_text(llm, [5, 6, 7, 8], max_tokens=6),
                                                   offline_text(llm, [9, 10, 11], max_tokens=6)]
    assert [c["index"] for c in ids["choices"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 7
    echo = got["echo"]["response"]["body"]["choices"][0]
    assert echo["text"] == TEXTS[2] + offline_text(llm, TEXTS[2], max_tokens=5, stop=["e"])
    chat = got["chat"]["response"]["body"]
    [offline] = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == offline.outputs[0].text
    assert chat["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    assert chat["usage"]["completion_tokens"] == len(offline.outputs[0].token_ids)
    sampled = got["chat-ids-n2"]["response"]["body"]["choices"]
    [offline] = llm.chat(CHAT[1:], SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=6), use_tqdm=False)
    assert [c["message"]["content"] for c in sampled] == [c.text for c in offline.outputs]
    assert stats.prompt_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in got.values())


def test_bad_requests_get_their_error_line_and_good_ones_still_run(llm, tmp_path):
    lines = [{"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
             {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
             {"custom_id": "no-body", "method": "POST", "url": "/v1/completions"},
             completion_line("type", "x", temperature="hot"),
             completion_line("model", "x", model="gpt-4o-mini"),
             completion_line("stream", "x", stream=True),
             completion_line("too-long", "x", max_tokens=500),
             completion_line("vocab", [5, 99999]),
             chat_line("schema", CHAT, guided_regex="[", max_tokens=4),
             completion_line("ok", TEXTS[3], max_tokens=4)]
    with ResultFile(str(tmp_path / "out.jsonl")) as results:
        stats = BatchRunner(llm.engine, ("tiny",), results).run(read_requests(str(write_jsonl(tmp_path / "in.jsonl",
                                                                                               lines))))
    got = read_results(tmp_path / "out.jsonl")
    assert len(got) == len(lines) and stats.failed == len(lines) - 1 and stats.succeeded == 1
    for custom_id, code in (("get", "invalid_method"), ("url", "invalid_url")):
        assert got[custom_id]["response"] is None and got[custom_id]["error"]["code"] == code
        assert got[custom_id]["error"]["message"]
    expected = {"no-body": (400, None), "type": (400, "temperature"), "model": (404, "model"),
                "stream": (400, "stream"), "too-long": (400, "max_tokens"), "vocab": (400, "prompt"),
                "schema": (400, "structured_outputs")}
    for custom_id, (status, param) in expected.items():
        record = got[custom_id]
        assert record["error"] is None and record["response"]["status_code"] == status, record
        error = record["response"]["body"]["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", record
    assert got["ok"]["response"]["body"]["choices"][0]["text"] == offline_text(llm, TEXTS[3], max_tokens=4)
    assert not llm.engine.has_unfinished_requests()


def test_output_ending_in_a_torn_line_is_repaired_and_resumed(llm, tmp_path, capsys):
    lines = [completion_line(f"r{i}", text, max_tokens=6) for i, text in enumerate(TEXTS)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run_batch_job(batch_args("tiny", inp, out), lambda: llm.engine) == 0
    full = read_results(out)
    err = capsys.readouterr().err
    assert "8 requests" in err and "generation tokens" in err and "tok/s" in err
    kept = out.read_text().splitlines(keepends=True)
    out.write_text("".join(kept[:3]) + kept[3][:25])  # as a kill in the middle of the 4th write leaves it
    assert run_batch_job(batch_args("tiny", inp, out), lambda: llm.engine) == 0
    assert "cut off the torn last line" in capsys.readouterr().err
    again = read_results(out)
    assert set(again) == set(full) and out.read_text().startswith("".join(kept[:3]))
    for custom_id, record in again.items():
        assert record["response"]["body"]["choices"] == full[custom_id]["response"]["body"]["choices"]


def test_killed_job_resumes_with_every_custom_id_once(checkpoint, llm, tmp_path):
    """A real `jaxinfer batch` process is SIGKILLed after its first results, then rerun."""
    lines = [completion_line(f"k{i:02d}", TEXTS[i % len(TEXTS)] + f" {i}", max_tokens=24, ignore_eos=True)
             for i in range(24)] + [chat_line("chat", CHAT, max_tokens=8)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "jaxinfer.cli", "batch", "--model", str(checkpoint), *ENGINE_FLAGS,
               "--max-num-seqs", "2", "--compilation-cache-dir", str(tmp_path / "xla-cache"),
               "-i", str(inp), "-o", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    try:
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no results within 120 s"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < len(lines), "the job finished before it could be killed"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {written} of {len(lines)}" in resumed.stderr and "tok/s" in resumed.stderr
    got = read_results(out)
    assert sorted(got) == sorted(line["custom_id"] for line in lines)
    prompts = [line["body"]["prompt"] for line in lines[:-1]]
    offline = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for line, expected in zip(lines, offline):
        assert got[line["custom_id"]]["response"]["body"]["choices"][0]["text"] == expected.outputs[0].text
    [chat] = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert got["chat"]["response"]["body"]["choices"][0]["message"]["content"] == chat.outputs[0].text
