"""torch only: the model, attention backends, losses and the DPO train loop.

| module            | what it holds                                                          |
| ----------------- | ---------------------------------------------------------------------- |
| `model.py`        | `ModelConfig` and the Llama-family decoder (`CausalLM`)                |
| `configs.py`      | named model sizes (`tiny`, ..., `small`, `smollm2_135m`)               |
| `checkpoint.py`   | Hugging Face folders: load, save (sharded), model fingerprint          |
| `attention.py`    | the `dense`, `segments`, `varlen` and `flex` backends from row metadata|
| `batch.py`        | `collate`: packed rows -> flat or padded tensors, backend, targets     |
| `logps.py`        | chunked head log-probs; `pair_logps`: sums per pair                    |
| `losses.py`       | sigmoid (DPO/cDPO), robust, IPO, hinge losses and the SFT term         |
| `reference.py`    | reference log-probs computed once, stored keyed, looked up by pair id  |
| `device.py`       | device, precision (bf16 autocast) and backend choices, TF32            |
| `parallel.py`     | DDP or FSDP2, gradient sync, full/sharded state dicts (DCP)            |
| `train_config.py` | `TrainConfig` and the names it chooses from (no torch: CLI, Dagster)   |
| `train.py`        | `setup`, `train_step`, `train` (the loop), checkpoints, `export`       |
| `report.py`       | run summary from metrics.jsonl; the Dagster Pipes reporter             |
| `cli.py`          | `prefpack train` and `prefpack logps`                                  |

The package imports nothing on import, so `prefpack --help` does not load torch.
"""
