"""Training an EAGLE draft head for a model, on text the model itself generates.

`jaxinfer train-eagle --model M --output DIR` writes a head in the published layout
(loading/eagle.py) that `--speculative-config '{"method": "eagle", "model": "DIR"}'` loads.

1. Data: the model answers prompts built from the Python standard library's docstrings
   (modules, public classes and functions: summarise, explain, rewrite, list, continue; prose
   the model is not asked about elsewhere in this project, the benchmark's own passages are
   never used) and short questions; sampled, through the engine.
2. Features: one dense forward of the model over each prompt + answer gives every position's
   final hidden state f_p (what its LM head reads).
3. Loss (EAGLE's): at each position p the head reads (embedding of x_{p+1}, f_p + noise) and
   guesses f_{p+1}: smooth-L1 to f_{p+1}, plus 0.1 x the cross-entropy of the LM head over the
   guess against the model's own next-token distribution (softmax of the LM head over f_{p+1}).
   The noise (uniform, +-`noise`) stands in for the head reading its own imperfect guesses
   when chained.
Dense attention over each sequence (ContiguousAttention), AdamW (optax), float32 master weights.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models import param_dtype
from jaxinfer.models.attention import ContiguousAttention, ContiguousMetadata

STDLIB_MODULES = ("abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
                  "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
                  "functools", "gzip", "hashlib", "heapq", "html", "http", "inspect", "ipaddress", "itertools",
                  "json", "logging", "mailbox", "mimetypes", "numbers", "operator", "os", "pathlib", "pickle",
                  "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
                  "signal", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
                  "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle",
                  "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "xml", "zipfile", "zlib")
TASKS = ("Summarize this documentation in plain words.", "Explain what this module is for to a beginner.",
         "Rewrite the following text more clearly, keeping every fact.",
         "List the main points of the following text.", "Continue the following text with one more paragraph.")
QUESTIONS = ("What is a function in programming?", "How do I read a file line by line?",
             "Why are unit tests useful?", "What does a database index do?", "Explain recursion with an example.",
             "What is the difference between a list and a tuple?", "How does a hash table work?",
             "Give three tips for writing clear emails.", "What is photosynthesis?", "How do vaccines work?",
             "Why is the sky blue?", "Describe a healthy breakfast.", "What is inflation?",
             "How do airplanes fly?", "Write a short poem about the sea.", "What causes earthquakes?")


def training_messages(max_chars: int = 1500) -> list[str]:
    """User messages for the data: tasks over the docstrings of stdlib modules and of the public
    classes and functions they define (a few hundred texts), then general questions."""
    import importlib
    import inspect

    texts, seen = [], set()
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module the platform lacks (e.g. turtle without tkinter)
            continue
        docs = [module.__doc__ or ""]
        with warnings.catch_warnings():  # touching deprecated members (typing.io, typing.re) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            for attr, obj in inspect.getmembers(module):
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                if (getattr(obj, "__module__", None) or "").split(".")[0] == name:  # defined here, not imported
                    docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            doc = " ".join(doc.split())
            if len(doc) > 200 and doc not in seen:
                seen.add(doc)
                texts.append(doc[:max_chars])
    messages = [f"{TASKS[i % len(TASKS)]}\n\n{text}" for i, text in enumerate(texts)]
    return messages + list(QUESTIONS)


def target_features(graphdef, params, tokens_bs: np.ndarray) -> jax.Array:
    """Final hidden states [B, S, D] of the model over token rows [B, S] (dense causal
    attention, each row its own sequence from position 0)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    b, s = tokens_bs.shape
    attention = ContiguousAttention()
    kv = attention.init_cache(c.num_layers, b, s, c.num_kv_heads, c.head_dim, param_dtype(params))
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, _ = model(jnp.asarray(tokens_bs).reshape(-1), positions.reshape(-1), kv,
                      ContiguousMetadata(positions), attention)
    return hidden.reshape(b, s, -1)


def head_guesses(head, target, tokens_bs, features_bsd):
    """The head's guesses [B, S - 1, D] for pairs (f_p, x_{p+1}), p < S - 1 (dense attention)."""
    b, s = tokens_bs.shape
    c = head.config
    attention = ContiguousAttention()
    kv = attention.init_cache(1, b, s - 1, c.num_kv_heads, c.head_dim, features_bsd.dtype)
    positions = jnp.broadcast_to(jnp.arange(s - 1, dtype=jnp.int32), (b, s - 1))
    embeds = target.embed_tokens(tokens_bs[:, 1:].reshape(-1)).astype(features_bsd.dtype)
    guesses, _ = head(embeds, features_bsd[:, :-1].reshape(b * (s - 1), -1), positions.reshape(-1), kv,
                      ContiguousMetadata(positions), attention)
    return guesses.reshape(b, s - 1, -1)


def eagle_loss(head_state, head_graphdef, target, tokens_bs, features_bsd, mask_bs, key, *, noise: float,
               cls_weight: float = 0.1):
    """EAGLE's loss over pairs p < S - 1 (mask_bs: 1 where x_{p+1} is real, not padding)."""
    head = nnx.merge(head_graphdef, head_state)
    noisy = features_bsd + jax.random.uniform(key, features_bsd.shape, features_bsd.dtype, -noise, noise)
    guesses = head_guesses(head, target, tokens_bs, noisy)
    want = features_bsd[:, 1:]
    mask = mask_bs[:, 1:].astype(jnp.float32)
    diff = jnp.abs(guesses - want)
    smooth_l1 = jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5).mean(-1)
    n = jnp.maximum(mask.sum(), 1.0)
    regression = (smooth_l1 * mask).sum() / n
    if not cls_weight:  # the feature regression alone: no [tokens, vocab] logits at all
        return regression, {"regression": regression}
    b, s1, d = guesses.shape
    logp = jax.nn.log_softmax(target.compute_logits(guesses.reshape(-1, d)), axis=-1)
    p_want = jax.nn.softmax(target.compute_logits(want.reshape(-1, d)), axis=-1)
    ce = -(p_want * logp).sum(-1).reshape(b, s1)
    top1 = (jnp.argmax(logp, -1) == jnp.argmax(p_want, -1)).reshape(b, s1)
    cross_entropy = (ce * mask).sum() / n
    return regression + cls_weight * cross_entropy, {"regression": regression, "cross_entropy": cross_entropy,
                                                     "top1": (top1 * mask).sum() / n}


def pack_sequences(sequences: list[list[int]], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at most seq_len tokens (longer sequences split into windows, each a sequence of
    its own from position 0), padded; (tokens [N, S], mask [N, S])."""
    rows = []
    for seq in sequences:
        for start in range(0, max(len(seq) - 1, 1), seq_len):
            window = seq[start:start + seq_len]
            if len(window) >= 2:
                rows.append(window)
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return tokens, mask


def train_head(model, sequences: list[list[int]], *, steps: int, batch_size: int, seq_len: int, lr: float = 3e-4,
               noise: float = 0.1, seed: int = 0, log_every: int = 50, log=print, cls_weight: float = 0.1,
               held_out: list[list[int]] | None = None):
    """Trains a head on `sequences` (token lists the model generated); returns
    (graphdef, state in float32, history of logged metrics). With `held_out` sequences, each
    logged entry also carries their metrics ("held_out_top1": how often the head's first guess
    is the model's own next token on text it was not trained on), and the state returned is the
    logged one with the best held-out top-1 (the history's last entry says which)."""
    import optax

    from jaxinfer.models.eagle import create_head

    tokens, mask = pack_sequences(sequences, seq_len)
    if not len(tokens):
        raise ValueError("no training sequence has two tokens or more")
    target = nnx.merge(model.graphdef, model.params)
    feats_fn = jax.jit(lambda t: target_features(model.graphdef, model.params, t))
    def all_features(rows_ns):
        chunks = []
        for i in range(0, len(rows_ns), batch_size):
            rows = rows_ns[i:i + batch_size]
            chunks.append(np.asarray(feats_fn(_pad_rows(rows, batch_size)).astype(jnp.float32))[:len(rows)])
        return np.concatenate(chunks)

    features = all_features(tokens)
    if held_out:
        val_tokens, val_mask = pack_sequences(held_out, seq_len)
        val_features = all_features(val_tokens)
    compute = param_dtype(model.params)
    head = create_head(model.config, dtype=jnp.float32, seed=seed)
    graphdef, state = nnx.split(head)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = opt.init(state)

    @jax.jit
    def update(state, opt_state, tokens_bs, features_bsd, mask_bs, key):
        def loss_of(s):
            cast = jax.tree.map(lambda x: x.astype(compute), s)
            return eagle_loss(cast, graphdef, target, tokens_bs, features_bsd.astype(compute), mask_bs, key,
                              noise=noise, cls_weight=cls_weight)
        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss, aux

    @jax.jit
    def evaluate(state, tokens_bs, features_bsd, mask_bs):
        cast = jax.tree.map(lambda x: x.astype(compute), state)
        loss, aux = eagle_loss(cast, graphdef, target, tokens_bs, features_bsd.astype(compute), mask_bs,
                               jax.random.key(0), noise=0.0)
        return aux, mask_bs[:, 1:].sum()

    def held_out_metrics(state) -> dict:
        sums, count = {}, 0
        for i in range(0, len(val_tokens), batch_size):
            rows = slice(i, i + batch_size)
            aux, n = evaluate(state, _pad_rows(val_tokens[rows], batch_size), _pad_rows(val_features[rows], batch_size),
                              _pad_rows(val_mask[rows], batch_size))
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + float(v) * float(n)
            count += float(n)
        return {f"held_out_{k}": v / max(count, 1.0) for k, v in sums.items()}

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history = []
    best = None  # (held-out top-1, step, state)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        pick = rng.integers(0, len(tokens), batch_size)
        key, sub = jax.random.split(key)
        state, opt_state, loss, aux = update(state, opt_state, tokens[pick], features[pick], mask[pick], sub)
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "loss": float(loss), **{k: float(v) for k, v in aux.items()},
                     "seconds": round(time.perf_counter() - t0, 1)}
            if held_out:
                entry.update(held_out_metrics(state))
                # A small head memorises a few hundred thousand tokens long before its steps
                # run out: the state returned is the one that did best on text it never saw.
                if best is None or entry["held_out_top1"] > best[0]:
                    best = (entry["held_out_top1"], step, state)
            history.append(entry)
            log(json.dumps(entry))
    if best is not None:
        history.append({"kept_step": best[1], "held_out_top1": best[0]})
        state = best[2]
    return graphdef, state, history


def _pad_rows(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([rows, np.zeros((n - len(rows), *rows.shape[1:]), rows.dtype)]) if len(rows) < n else rows


def generate_data(llm, messages: list[str], *, max_tokens: int, temperature: float, repeats: int, seed: int
                  ) -> list[list[int]]:
    """Prompt + answer token lists: each message `repeats` times (sampled answers differ)."""
    from jaxinfer.sampling_params import SamplingParams

    tok = llm.get_tokenizer()
    prompts = []
    for _ in range(repeats):
        for m in messages:
            text = tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)
            prompts.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False)})
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]


def cmd_train_eagle(args) -> int:
    from jaxinfer.llm import LLM
    from jaxinfer.loading.eagle import save_eagle_head

    t0 = time.perf_counter()
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_model_len=2048)
    messages = training_messages()[:args.max_messages] if args.max_messages else training_messages()
    sequences = generate_data(llm, messages, max_tokens=args.max_tokens, temperature=args.temperature,
                              repeats=args.repeats, seed=args.seed)
    t1 = time.perf_counter()
    tokens = sum(map(len, sequences))
    print(f"data: {len(sequences)} sequences, {tokens} tokens in {t1 - t0:.1f} s", file=sys.stderr, flush=True)
    model = llm.model
    # Every tenth message's answers are held out (whole messages: text the head never saw).
    held = [i % len(messages) % 10 == 9 for i in range(len(sequences))]
    train = [seq for seq, h in zip(sequences, held) if not h]
    held_out = [seq for seq, h in zip(sequences, held) if h]
    graphdef, state, history = train_head(model, train, steps=args.steps, batch_size=args.batch_size,
                                          seq_len=args.seq_len, lr=args.lr, noise=args.noise, seed=args.seed,
                                          cls_weight=args.cls_weight, held_out=held_out,
                                          log=lambda s: print(s, file=sys.stderr, flush=True))
    head = nnx.merge(graphdef, state)
    out = save_eagle_head(args.output, state, head.config)
    (out / "training.json").write_text(json.dumps(
        {"model": args.model, "messages": len(messages), "sequences": len(sequences), "tokens": tokens,
         "held_out_sequences": len(held_out),
         "data_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1, "args": {
             k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}, "history": history}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0
