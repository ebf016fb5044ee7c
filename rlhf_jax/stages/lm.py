"""Language-model loss and steps shared by pretraining and SFT.

Batches are the LM batches of `rlhf_jax.data.pipeline`:
  tokens, segment_ids, positions  int32[B, T]
  loss_mask                       f32[B, T]: weight of predicting tokens[:, t]
Pretraining's mask covers every token but the first of each packed document; SFT's
covers only assistant contents and their EOS, so prompt tokens never enter the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sharding
from rlhf_jax.models import TransformerConfig, apply
from rlhf_jax.train import optim, train_state

LM_BATCH_NDIMS = {"tokens": 2, "segment_ids": 2, "positions": 2, "loss_mask": 2}


def lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
  """Masked next-token cross-entropy: returns (sum of losses, number of targets).

  logits: f32[B, T, V] (logits[:, t] predicts tokens[:, t + 1]); tokens: int[B, T];
  loss_mask: f32[B, T], the weight of tokens[:, t] as a target.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  weights = loss_mask[:, 1:]
  return jnp.sum(nll * weights), jnp.sum(weights)


def logits(model_cfg: TransformerConfig, params, batch, rng=None) -> jax.Array:
  train = rng is not None and max(model_cfg.dropout, model_cfg.lora_dropout) > 0
  out, _ = apply(
    model_cfg,
    params,
    batch["tokens"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=not train,
    rngs={"dropout": rng} if train else None,
  )
  return out["lm"]


def train_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  *,
  model_cfg: TransformerConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  ema_decay: float = 0.0,
  prefix: str = "train",
  grad_accum: int = 1,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimiser step on the mean masked next-token loss (over `grad_accum`
  microbatches taken one at a time: the same mean, less activation memory). With LoRA
  (`train_state.AdaptedState`) the gradients are the adapters' alone."""

  def sum_loss(params, mb, rng):
    out = logits(model_cfg, train_state.model_params(state, params), mb, rng)
    return lm_loss(out, mb["tokens"], mb["loss_mask"]), ()

  loss, count, _, grads = train_state.accumulated_grads(
    sum_loss, state.params, batch, train_state.step_rng(state), grad_accum
  )
  new_state = state.apply_gradients(grads, tx, ema_decay, loss=loss)
  metrics = {
    f"{prefix}/loss": loss,
    f"{prefix}/targets": count,
    f"{prefix}/grad_norm": train_state.global_norm(grads),
    f"{prefix}/param_norm": train_state.global_norm(new_state.params),
    f"{prefix}/lr": schedule(state.step) * state.guard.lr_scale,
  }
  return new_state, optim.guarded_metrics(metrics, new_state.guard)


def eval_step(params, batch: dict[str, jax.Array], *, model_cfg: TransformerConfig):
  """Summed loss and target count of a batch (to average over a whole eval set)."""
  total, count = lm_loss(logits(model_cfg, params, batch), batch["tokens"], batch["loss_mask"])
  return {"loss_sum": total, "count": count}


def evaluate_loss(eval_fn, params, batches, put) -> float:
  """Mean per-token loss over every batch of a finite iterator."""
  total, count = 0.0, 0.0
  for batch in batches:
    out = jax.tree.map(sharding.to_host, eval_fn(params, put(batch)))
    total += float(out["loss_sum"])
    count += float(out["count"])
  return total / max(count, 1.0)


def model_flops_per_step(
  model_cfg: TransformerConfig, batch: int, seq: int, lm_head: bool = True
) -> float:
  """Training FLOPs per step (6 x matmul params x tokens + attention), for MFU.

  `lm_head=False` for models read through the scalar head (reward, value).
  """
  d, hd = model_cfg.d_model, model_cfg.dim_per_head
  per_layer = d * hd * (2 * model_cfg.n_heads + 2 * model_cfg.n_kv_heads)
  per_layer += 3 * d * model_cfg.mlp_dim
  dense = model_cfg.n_layers * per_layer + (d * model_cfg.vocab_size if lm_head else d)
  attn = model_cfg.n_layers * 2 * 2 * seq * seq * model_cfg.n_heads * hd
  return float(6 * dense * batch * seq + 3 * attn * batch)


def batches_per_epoch(pipeline_fn) -> int:
  """Count the batches one epoch of a (finite, `num_epochs=1`) pipeline yields."""
  return int(sum(1 for _ in pipeline_fn()))


def numpy_batch(batch) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}
