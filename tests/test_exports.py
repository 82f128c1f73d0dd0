"""Each sub-package exports its public names (``from cm3.tokenizers import VQGAN``), lazily: importing a package
stays free of torch until a name is used, and `cm3.tokenizers` stays a namespace portion that does not shadow
Hugging Face's `tokenizers` from the repository root."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ["cm3.core", "cm3.tokenizers", "cm3.pipeline", "cm3.synthetic", "cm3.index", "cm3.model", "cm3.evaluation"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_the_object_its_module_defines(package):
    module = importlib.import_module(package)
    names = dir(module)
    assert names, f"{package} exports nothing"
    for name in names:
        value = getattr(module, name)
        assert getattr(value, "__module__", "").startswith(package + "."), (package, name, value)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_from_imports_work_and_stay_light():
    code = ("import sys\n"
            "import cm3.core, cm3.tokenizers, cm3.pipeline, cm3.synthetic, cm3.index, cm3.model, cm3.evaluation\n"
            "assert 'torch' not in sys.modules, 'a package import pulled in torch'\n"
            "from cm3.tokenizers import VQGAN, Vocabulary\n"
            "from cm3.model import CM3, load_checkpoint\n"
            "assert VQGAN.__module__ == 'cm3.tokenizers.vqgan' and CM3.__module__ == 'cm3.model.decoder'\n"
            "import tokenizers\n"
            "assert 'site-packages' in tokenizers.__file__, tokenizers.__file__\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)  # cwd: the repository root is on sys.path
