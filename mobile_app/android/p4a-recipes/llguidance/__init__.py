"""A local python-for-android recipe for `llguidance` (Rust, PyO3, built with maturin): constrained decoding
(runtime/constrain.py) on the phone, the JSON answers and tool calls the app holds to their grammars.

Same kind of package as tokenizers (see ../tokenizers), so the same base recipe. llguidance has no Python
dependencies. Not built on this repository's machines (no Android NDK or Rust Android targets there); the
first buildozer run on a build machine is its test. Without it the app still runs: tool calls are then parsed,
not held (constrain.available() is False).
"""

from pythonforandroid.recipe import RustCompiledComponentsRecipe


class LlguidanceRecipe(RustCompiledComponentsRecipe):
    name = "llguidance"
    version = "1.9.1"  # the version the project's tests run on the desktop
    url = "https://files.pythonhosted.org/packages/source/l/llguidance/llguidance-{version}.tar.gz"
    depends = []


recipe = LlguidanceRecipe()
