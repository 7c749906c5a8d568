"""The schemas of every stage (pyarrow schemas + validators), versioned.

One module per contract; each holds `VERSION`, `SCHEMA` and `CONTRACT` (a `Contract`
with named row rules whose names double as quarantine and drop reasons).
"""

from data_contracts.contract import Contract, ContractError

__all__ = ["Contract", "ContractError"]
