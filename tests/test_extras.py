import pytest

from hyprstream._extras import require
from hyprstream.errors import HyprstreamError, MissingExtraError

pytestmark = pytest.mark.unit


def test_missing_module_names_the_extra():
    with pytest.raises(MissingExtraError) as info:
        require("hyprstream_no_such_module", extra="cuda", feature="CUDA inference")
    assert "pip install 'hyprstream[cuda]'" in str(info.value)
    assert isinstance(info.value, HyprstreamError) and isinstance(info.value, ImportError)


def test_present_module_is_returned():
    assert require("json", extra="none", feature="json").dumps([1]) == "[1]"
