"""torch only: the model, attention backends, losses, the DPO trainer and its recipes.

| module               | what it holds                                                        |
| -------------------- | -------------------------------------------------------------------- |
| `model.py`           | `ModelConfig` and the decoder (`CausalLM`)                           |
| `configs.py`         | named model sizes (`tiny`, ..., `small`, `smollm2_135m`)             |
| `checkpoint.py`      | Hugging Face folders: load, save (sharded), model fingerprint        |
| `export_files.py`    | an export's tokenizer files and generation_config.json (no torch)    |
| `tokenizer_match.py` | whether a model folder's tokenizer is the shards' (no torch)         |
| `model_card.py`      | the exported README.md, a Hugging Face model card (no torch)         |
| `attention.py`       | the `dense`, `segments`, `varlen` and `flex` backends from row metadata |
| `batch.py`           | `PackedRows`; `collate`: packed rows -> tensors, backend, targets    |
| `logps.py`           | chunked head log-probs; `pair_logps`: sums per pair                  |
| `losses.py`          | the preference losses and the SFT term                               |
| `lora.py`            | LoRA adapters on the projections, adapters off, PEFT's files         |
| `reference.py`       | reference log-probs computed once, stored keyed, looked up by pair id |
| `device.py`          | device, precision (bf16 autocast) and backend choices, TF32          |
| `ranks.py`           | torchrun's ranks, the process group, rank 0's decisions for all      |
| `parallel.py`        | DDP or FSDP2, gradient sync, full/sharded state dicts (DCP)          |
| `train_config.py`    | `TrainConfig` and the names it chooses from (no torch: CLI, Dagster) |
| `train.py`           | the trainer: `setup`, `train_step`, `evaluate`, `fit`, `export`      |
| `recipe.py`          | `prefpack train`/`logps`/`difficulty` from paths: `TrainRecipe`, ... |
| `difficulty.py`      | k-fold held-out scores of every pair (Selective DPO)                 |
| `trackers.py`        | `--report-to` TensorBoard, W&B, MLflow (each an optional extra)      |
| `report.py`          | run summary from metrics.jsonl; the Dagster Pipes reporter           |
| `cli.py`             | the flags of `prefpack train`, `logps` and `difficulty`              |

The package imports nothing on import, so `prefpack --help` does not load torch.
"""
