"""The embedded demo model's making, apart from serving: `data` is the world it knows (captioned coloured shapes,
drawn and read back), `train` trains it from scratch (`make demo-model`). The server never imports this package;
it loads the result, a plain diffusers folder in `sdserve/models/demo` (engine/demo.py says where)."""
