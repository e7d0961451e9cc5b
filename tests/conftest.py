"""Settings for every test: torch computes on one thread. The tests run many small models, where a second
thread costs more than it gives (each op waits for it to be scheduled, which on a busy machine takes
milliseconds); the fuzzer in bench/fuzz.py does the same."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
