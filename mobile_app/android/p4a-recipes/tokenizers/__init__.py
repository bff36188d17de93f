"""A local python-for-android recipe for Hugging Face `tokenizers` (Rust, PyO3, built with maturin).

python-for-android 2026.5.9 ships no tokenizers recipe; it does ship RustCompiledComponentsRecipe, which its
tiktoken and pydantic-core recipes use for the same kind of package, so this follows the tiktoken recipe.
buildozer.spec points p4a.local_recipes at this folder. Not built on this repository's machines (no Android
NDK or Rust Android targets there); the first buildozer run on a build machine is its test.
"""

from pythonforandroid.recipe import RustCompiledComponentsRecipe


class TokenizersRecipe(RustCompiledComponentsRecipe):
    name = "tokenizers"
    version = "0.23.3"  # the version the project's tests run on the desktop
    url = "https://files.pythonhosted.org/packages/source/t/tokenizers/tokenizers-{version}.tar.gz"
    depends = []


recipe = TokenizersRecipe()
