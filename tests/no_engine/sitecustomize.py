"""On PYTHONPATH, makes torch, diffusers and transformers unimportable: proves a process runs without them
(the `api` role). Any import of theirs raises, and the process fails the way a slim API image would."""

import sys

BLOCKED = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in an API replica (tests/no_engine)")
        return None


sys.meta_path.insert(0, _Blocker())
