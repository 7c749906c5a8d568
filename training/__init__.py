"""torch only: the model, attention backends, losses and the DPO train loop.

| module            | what it holds                                                          |
| ----------------- | ---------------------------------------------------------------------- |
| `model.py`        | `ModelConfig` and the Llama-family decoder (`CausalLM`)                |
| `configs.py`      | named model sizes (`tiny`, `tiny_qwen2`, `tiny_llama3`, `small`)       |
| `checkpoint.py`   | Hugging Face folders: load, save (sharded), model fingerprint          |
| `attention.py`    | the `dense`, `segments` and `flex` backends built from row metadata    |
| `batch.py`        | `collate`: packed rows -> padded tensors, backend and log-prob targets |
| `logps.py`        | `pair_logps`: summed chosen/rejected log-probs per pair                |
| `losses.py`       | sigmoid (DPO/cDPO), robust, IPO, hinge losses and the SFT term         |
| `reference.py`    | reference log-probs computed once, stored keyed, looked up by pair id  |
| `device.py`       | device and precision (bf16 autocast) choices                           |
| `train_config.py` | `TrainConfig` and the names it chooses from (no torch: CLI, Dagster)   |
| `train.py`        | `train`: the loop, checkpoints, resume, DDP, export                    |
| `report.py`       | run summary from metrics.jsonl; the Dagster Pipes reporter             |
| `cli.py`          | `prefpack train` and `prefpack logps`                                  |

The package imports nothing on import, so `prefpack --help` does not load torch.
"""
