"""The default study (configs/default.py: model, sizes, thresholds) with every behaviour of the
published code (github eliroc98/refusal_direction, commit 3c80103) switched on: each
`reference.*` switch undoes one departure of docs/method.md section 7, so flipping one back to
False shows what that departure changes.

`select.when_none_pass = "lowest_bypass"`: the published code falls back on an unfiltered
candidate when no INLP candidate passes the filters, where the default config stops.
"""

import runpy
from pathlib import Path

from refusal_jax.study.config import REFERENCE_SWITCHES

_DEFAULT = Path(__file__).with_name("default.py")


def get_config():
    config = runpy.run_path(str(_DEFAULT))["get_config"]()
    for name in REFERENCE_SWITCHES:
        config.reference[name] = True
    config.select.when_none_pass = "lowest_bypass"
    return config
