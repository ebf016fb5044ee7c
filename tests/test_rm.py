"""Reward model: batches keep comparisons whole, a toy preference is learnt, the stage
normalises its bias on the demonstrations, and a step on the 8-device mesh equals the
single-device step."""

import functools
import itertools
import json
import os

import jax
import numpy as np
import pytest
from test_comparisons import make_config, prepare_workdir

from rlhf_jax import losses, sharding
from rlhf_jax import tokenizer as tokenizer_lib
from rlhf_jax.data import labelers, ranking
from rlhf_jax.data import world as world_lib
from rlhf_jax.models import init_params
from rlhf_jax.stages import common, comparisons, rm
from rlhf_jax.train import checkpoints, optim, train_state

WORDS = "the cat dog sat on a mat and ran fast slow red blue green big small".split()
MARKER = "zebra"


def _text(rng, n):
  return " ".join(rng.choice(WORDS, n))


def _toy_rankings(n, seed, k_range=(2, 5)):
  """Comparisons where the one response holding MARKER is always ranked first."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(*k_range))
    responses = [_text(rng, rng.integers(2, 6)) for _ in range(k)]
    best = int(rng.integers(k))
    words = responses[best].split()
    words.insert(int(rng.integers(len(words) + 1)), MARKER)
    responses[best] = " ".join(words)
    rest = [i for i in rng.permutation(k) if i != best]
    out.append(
      {
        "messages": [{"role": "user", "content": _text(rng, rng.integers(1, 6))}],
        "responses": responses,
        "ranking": [best, *(int(i) for i in rest)],
      }
    )
  return out


@pytest.fixture(scope="module")
def tok():
  rng = np.random.default_rng(0)
  texts = [f"User: {_text(rng, 6)}\nAssistant: {_text(rng, 6)} {MARKER}" for _ in range(300)]
  return tokenizer_lib.train(texts, vocab_size=300)


def _toy_config(extra=(), **rm_fields):
  overrides = [("tokenizer.vocab_size", "300"), ("model.vocab_size", "300"), *extra]
  overrides += [(f"rm.{k}", str(v)) for k, v in rm_fields.items()]
  return make_config(overrides)


def test_batches_keep_every_pair_of_a_comparison_in_one_element(tok):
  records = _toy_rankings(20, seed=1, k_range=(2, 6))
  p = ranking.ranking_batches(
    records, tok, batch_size=4, seq_len=32, max_responses=5, seed=0, num_epochs=1
  )
  seen = []
  for batch in p:
    pairs = np.asarray(losses.ranking_pairs(batch["rank"]))
    for b, index in enumerate(batch["index"]):
      rec = records[int(index)]
      k = len(rec["responses"])
      # All C(K, 2) pairs of the comparison are in this element, winner -> loser as ranked.
      want = set(itertools.combinations(rec["ranking"], 2))
      assert set(zip(*np.nonzero(pairs[b]), strict=True)) == want
      assert pairs[b].sum() == k * (k - 1) // 2
      # Sequence j is the prompt followed by response j (decoded back), ending at last_index.
      for j, text in enumerate(rec["responses"]):
        n = batch["prompt_len"][b, j]
        last = batch["last_index"][b, j]
        assert tok.decode(batch["tokens"][b, j, n : last + 1]) == text
        assert batch["tokens"][b, j, last] == tok.eos_id
      seen.append(int(index))
  assert sorted(seen) == list(range(20))  # each comparison once per epoch: never split
  # The evaluation batches hold every comparison once too, in order, padding marked.
  batches, _ = ranking.fixed_batches(records, tok, batch_size=8, seq_len=32, max_responses=5)
  batches = list(batches)
  index = np.concatenate([b["index"] for b in batches])
  assert list(index[:20]) == list(range(20)) and (index[20:] == -1).all()
  assert (batches[-1]["rank"][index[16:] == -1] == -1).all()


def test_reward_model_learns_toy_preference(tok):
  config = _toy_config(batch_size=16, seq_len=48, max_responses=4)
  num_steps = 30
  with config.unlocked():
    config.rm.optim.lr = 3e-3
    config.rm.optim.warmup_steps = 5
  # One device, no mesh: the same pure step, jitted plainly.
  model_cfg = common.model_config(config)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(0), heads=rm.HEADS)
  tx = optim.make_optimizer(config.rm.optim, num_steps)
  state = train_state.TrainState.create(params, tx, jax.random.PRNGKey(1))
  schedule = optim.lr_schedule(config.rm.optim, num_steps)
  step = jax.jit(
    functools.partial(rm.train_step, model_cfg=model_cfg, tx=tx, schedule=schedule),
    donate_argnums=0,
  )
  kw = dict(seq_len=48, max_responses=4)
  data = iter(ranking.ranking_batches(_toy_rankings(200, seed=0), tok, batch_size=16, seed=0, **kw))
  put = lambda b: {k: b[k] for k in rm.BATCH_NDIMS}
  for _ in range(num_steps):
    state, metrics = step(state, put(next(data)))
  # Held out: chosen (with the marker) vs rejected pairs.
  held_out = _toy_rankings(64, seed=99, k_range=(2, 3))
  batches, _ = ranking.fixed_batches(held_out, tok, batch_size=16, **kw)
  eval_fn = jax.jit(lambda p, b: rm.eval_step(p, b, model_cfg=model_cfg))
  r, _, index = rm.score(eval_fn, state.params, batches, put)
  # Read the chosen / rejected responses off the source records, not the batch's ranks.
  chosen = np.asarray([r[row, held_out[i]["ranking"][0]] for row, i in enumerate(index)])
  rejected = np.asarray([r[row, held_out[i]["ranking"][1]] for row, i in enumerate(index)])
  acc = float(np.mean(chosen > rejected))
  assert float(metrics["rm/loss"]) < 0.5
  assert acc > 0.9, acc


def _world_rankings(config, workdir, split, n, seed):
  """Labeler rankings of mixed-quality world responses (with tasks, so gold accuracy)."""
  world = world_lib.make_world(config.world)
  source = common.world_source(config, workdir, "prompts", split)
  rng = np.random.default_rng(seed)
  records = [source[i] for i in range(n)]
  responses = [
    labelers.mixed_responses(world, r["task"], labelers.num_responses(rng, config.world), rng)
    for r in records
  ]
  # Distinct texts only (a ranking file may not rank a text against itself).
  responses = [list(dict.fromkeys(rs)) for rs in responses]
  kept = [i for i, rs in enumerate(responses) if len(rs) >= 2]
  records, responses = [records[i] for i in kept], [responses[i] for i in kept]
  tasks, messages = [r["task"] for r in records], [r["messages"] for r in records]
  return labelers.rank(tasks, messages, responses, rng, config.world)


def test_add_bias_shifts_every_reward_and_nothing_else(tok):
  """The normalisation the stage folds into the scalar head moves each reward by the bias."""
  config = _toy_config(seq_len=48, max_responses=4)
  model_cfg = common.model_config(config)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(4), heads=rm.HEADS)
  params["scalar_head"]["kernel"] = params["scalar_head"]["kernel"] + 0.1  # not all zero
  batches, _ = ranking.fixed_batches(
    _toy_rankings(8, seed=3), tok, batch_size=8, seq_len=48, max_responses=4
  )
  batch = {k: v for k, v in next(batches).items() if k in rm.BATCH_NDIMS}
  eval_fn = jax.jit(lambda p, b: rm.eval_step(p, b, model_cfg=model_cfg))
  before, after = eval_fn(params, batch), eval_fn(rm.add_bias(params, -0.75), batch)
  np.testing.assert_allclose(after, before - 0.75, rtol=1e-6, atol=1e-6)
  shifted = rm.add_bias(params, 0.5)
  assert {k for k in params if k != "scalar_head"} == {k for k in shifted if k != "scalar_head"}
  np.testing.assert_array_equal(shifted["scalar_head"]["kernel"], params["scalar_head"]["kernel"])


def test_packed_layout_gives_the_padded_rewards_loss_and_gradients(tok):
  """One row per comparison (the prompt once, K responses against it) computes what K
  padded sequences compute: rewards, pairwise loss and its gradients, to 1e-5."""
  config = _toy_config(max_responses=5)
  model_cfg = common.model_config(config)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(5), heads=rm.HEADS)
  params["scalar_head"]["kernel"] = jax.random.normal(
    jax.random.PRNGKey(6), params["scalar_head"]["kernel"].shape
  )
  records = _toy_rankings(12, seed=7, k_range=(2, 6))
  kw = dict(batch_size=12, seq_len=64, max_responses=5)
  padded, padded_stats = ranking.fixed_batches(records, tok, **kw)
  packed, packed_stats = ranking.fixed_batches(records, tok, packed_len=200, **kw)
  assert padded_stats["truncated"] == packed_stats["truncated"] == 0
  padded = {k: v for k, v in next(padded).items() if k in rm.BATCH_NDIMS}
  packed = {k: v for k, v in next(packed).items() if k in rm.PACKED_BATCH_NDIMS}
  assert packed["tokens"].shape == (12, 200) and padded["tokens"].shape == (12, 5, 64)
  np.testing.assert_array_equal(packed["rank"], padded["rank"])

  def loss(p, batch):
    r = rm.rewards(model_cfg, p, batch)
    return losses.pairwise_loss(r, batch["rank"]), r

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l_pad, r_pad), g_pad = grad_fn(params, padded)
  (l_pack, r_pack), g_pack = grad_fn(params, packed)
  real = padded["rank"] >= 0
  assert np.ptp(np.asarray(r_pad)[real]) > 0.1  # the rewards differ between responses
  np.testing.assert_allclose(np.asarray(r_pack)[real], np.asarray(r_pad)[real], atol=1e-5)
  assert abs(float(l_pack) - float(l_pad)) <= 1e-5
  for a, b in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_pad), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_rows_hold_the_prompt_once_then_each_response(tok):
  records = _toy_rankings(6, seed=8, k_range=(3, 6))
  kw = dict(batch_size=6, seq_len=48, max_responses=5, seed=0, num_epochs=1, shuffle=False)
  batch = next(iter(ranking.ranking_batches(records, tok, packed_len=128, **kw)))
  for b, rec in enumerate(records):
    prompt = tok.encode_prompt(rec["messages"])
    p = len(prompt)
    seg, pos, toks = batch["segment_ids"][b], batch["positions"][b], batch["tokens"][b]
    assert list(toks[:p]) == prompt and (seg[:p] == 1).all()
    np.testing.assert_array_equal(pos[:p], np.arange(p))
    start = p
    for j, text in enumerate(rec["responses"]):
      ids = tok.encode_response(text)
      end = start + len(ids)
      assert list(toks[start:end]) == ids and (seg[start:end] == 2 + j).all()
      np.testing.assert_array_equal(pos[start:end], np.arange(p, p + len(ids)))
      assert batch["last_index"][b, j] == end - 1
      start = end
    assert (seg[start:] == 0).all()
  # A row too short for the responses skips the comparison; one short for the prompt
  # cuts the prompt from the left, keeping BOS.
  need = [sum(len(tok.encode_response(t)) for t in r["responses"]) for r in records]
  p = ranking.ranking_batches(records[:1], tok, packed_len=need[0] + 1, **{**kw, "batch_size": 1})
  (row,) = list(p)
  assert p.stats["truncated"] == 1 and list(row["segment_ids"][0, :2]) == [1, 2]
  assert row["tokens"][0, 0] == tok.encode_prompt(records[0]["messages"])[0] == tokenizer_lib.BOS_ID
  short = {"messages": records[0]["messages"], "responses": ["cat", "dog"], "ranking": [1, 0]}
  p = ranking.ranking_batches(
    [records[0], short], tok, packed_len=need[0], **{**kw, "batch_size": 1}
  )
  assert [int(r["index"][0]) for r in p] == [1] and p.stats["skipped_response_too_long"] == 1


@pytest.mark.slow  # a whole RM stage (its step: the tests above)
def test_stage_normalises_reward_on_demonstrations(tmp_path):
  workdir = str(tmp_path)
  config = make_config()
  prepare_workdir(workdir, config)
  # Comparisons from a rankings file (the user-data path), so no sampling here.
  paths = {}
  for split, n in (("train", 32), ("validation", 16)):
    paths[split] = str(tmp_path / f"user_{split}.jsonl")
    with open(paths[split], "w") as f:
      for r in _world_rankings(config, workdir, split, n, seed=len(split)):
        f.write(json.dumps(r) + "\n")
  config = make_config(
    [
      ("comparisons.user_train", paths["train"]),
      ("comparisons.user_validation", paths["validation"]),
      ("rm.num_steps", "4"),
      ("rm.bias_demos", "24"),
    ]
  )
  comparisons.train_and_evaluate(config, workdir)
  summary = rm.train_and_evaluate(config, workdir)
  for key in ("rm/val_accuracy", "rm/val_gold_accuracy", "rm/val_loss", "rm/reward_bias"):
    assert np.isfinite(summary[key]), key
  info = checkpoints.params_info(f"{workdir}/rm")
  assert info["reward_bias"] == summary["rm/reward_bias"] != 0.0
  with open(f"{workdir}/rm/metrics.jsonl") as f:
    assert any("rm/val_accuracy" in json.loads(line) for line in f)
  assert os.path.isdir(f"{workdir}/rm/checkpoints/4")
  # The exported parameters hold the bias: mean demonstration reward ~ 0.
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  params, _ = rm.load_reward_model(config, workdir, mesh, rules)
  tok = common.load_tokenizer(config, workdir)
  demos = rm.demonstration_records(config, workdir, 24)
  eval_fn = jax.jit(lambda p, b: rm.eval_step(p, b, model_cfg=common.model_config(config)))
  put = lambda b: sharding.put_batch({k: b[k] for k in rm.BATCH_NDIMS}, mesh)
  with sharding.use(mesh, rules):
    mean = rm.mean_reward(eval_fn, params, demos, tok, batch_size=8, seq_len=64, put=put)
    unnormalised = rm.add_bias(params, -info["reward_bias"])
    raw = rm.mean_reward(eval_fn, unnormalised, demos, tok, batch_size=8, seq_len=64, put=put)
  assert abs(mean) < 1e-5
  assert abs(raw) > 1e-4  # (the check above is not vacuous)
  # Done: a re-run returns the recorded metrics without training.
  assert rm.train_and_evaluate(config, workdir) == info["metrics"]


# data parallel + FSDP + tensor parallel; tensor parallel with data parallel
@pytest.mark.parametrize("mesh", [(2, 2, 2), pytest.param((4, 1, 2), marks=pytest.mark.slow)])
def test_step_under_each_strategy_equals_single_device(tok, mesh):
  mesh_args = [(f"mesh.{a}", str(n)) for a, n in zip(("data", "fsdp", "tensor"), mesh, strict=True)]
  config = _toy_config(mesh_args, batch_size=8, seq_len=48, max_responses=4)
  setup = rm.create_state(config, 10)
  gate = setup.state.params["layer_0"]["mlp"]["gate"]
  assert gate.addressable_shards[0].data.shape == (
    gate.shape[0] // mesh[1],
    gate.shape[1] // mesh[2],
  )
  batch = next(
    iter(
      ranking.ranking_batches(
        _toy_rankings(8, seed=3), tok, batch_size=8, seq_len=48, max_responses=4, seed=0
      )
    )
  )
  batch = {k: batch[k] for k in rm.BATCH_NDIMS}
  kw = dict(model_cfg=setup.model_cfg, tx=setup.tx, schedule=optim.lr_schedule(config.rm.optim, 10))
  # Take a few steps so the scalar head is non-zero and the trunk gets gradients.
  state0 = jax.device_get(setup.state)
  step = common.jit_step(rm.train_step, setup, rm.BATCH_NDIMS, **kw)
  with sharding.use(setup.mesh, setup.rules):
    state, metrics = setup.state, None
    for _ in range(2):
      state, metrics = step(state, sharding.put_batch(batch, setup.mesh))
  single = jax.jit(lambda s, b: rm.train_step(s, b, **kw))
  ref, ref_metrics = jax.device_put(state0, jax.devices()[0]), None
  for _ in range(2):
    ref, ref_metrics = single(ref, jax.device_put(batch, jax.devices()[0]))
  np.testing.assert_allclose(metrics["rm/loss"], ref_metrics["rm/loss"], rtol=1e-5)
  # The pairwise loss is blind to the scalar head's bias (r_w - r_l): its gradient is
  # round-off, which Adam scales up to lr-sized steps of either sign. Everything else
  # must agree.
  a, b = jax.device_get(state.params), jax.device_get(ref.params)
  a["scalar_head"], b["scalar_head"] = a["scalar_head"]["kernel"], b["scalar_head"]["kernel"]
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4),
    a,
    b,
  )
  assert float(np.abs(jax.device_get(state.params)["scalar_head"]["kernel"]).sum()) > 0


def test_gradient_accumulation_equals_the_whole_batch(tok):
  """Comparisons stay whole in a microbatch; 2 microbatches give the whole batch's step,
  and the per-element rewards (for the metrics) come back in batch order."""
  config = _toy_config((), batch_size=8, seq_len=48, max_responses=4)
  setup = rm.create_state(config, 10)
  batch = next(
    iter(
      ranking.ranking_batches(
        _toy_rankings(8, seed=5), tok, batch_size=8, seq_len=48, max_responses=4, seed=0
      )
    )
  )
  batch = {k: batch[k] for k in rm.BATCH_NDIMS}
  kw = dict(model_cfg=setup.model_cfg, tx=setup.tx, schedule=optim.lr_schedule(config.rm.optim, 10))
  state0 = jax.device_get(setup.state)
  out = {}
  for n in (1, 2):
    step = jax.jit(lambda s, b, n=n: rm.train_step(s, b, grad_accum=n, **kw))
    state, metrics = step(state0, batch)  # two steps: the head is non-zero after one
    state, metrics = step(state, batch)
    out[n] = (jax.device_get(state.params), jax.device_get(metrics))
  for k in ("rm/loss", "rm/accuracy", "rm/reward_mean", "rm/reward_std", "rm/grad_norm"):
    np.testing.assert_allclose(out[1][1][k], out[2][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
  a, b = out[1][0], out[2][0]
  a["scalar_head"], b["scalar_head"] = a["scalar_head"]["kernel"], b["scalar_head"]["kernel"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), a, b)
