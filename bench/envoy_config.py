"""The Envoy configs of the bench, derived from deploy/envoy.yaml.

Each is deploy/envoy.yaml (same listener, path normalization, Tollway filters
and tollway cluster) with these edits:

* the route answers with a `direct_response` (200, "ok"): the upstream costs
  nothing, so what is left is Envoy plus the authorizer;
* a header_mutation filter, first in the chain, copies the `k` query
  parameter into x-api-key (h2load can vary URIs per request but not
  headers; this is how the 10,000-key Zipf mix reaches Envoy). Every variant
  has it, so it cancels out of the ratios;
* for the ceiling only, every Tollway filter of the chain (ext_authz, and
  ext_proc when deploy/envoy.yaml runs it) is disabled on that same route;
* for the "ext_authz only" pair, the Tollway filters named in `without`
  (ext_proc) are cut out of the chain, comments above them included, so
  that pair shows what those filters cost.

The edits are textual and each must apply exactly once, so a change to
deploy/envoy.yaml that breaks them fails loudly rather than benchmarking
something else.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

from tests.harness import render_envoy_config

__all__ = [
    "EXT_AUTHZ",
    "EXT_PROC",
    "KEY_QUERY_PARAM",
    "TOLLWAY_FILTERS",
    "render",
    "tollway_filters",
]

KEY_QUERY_PARAM: Final = "k"
EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
EXT_PROC: Final = "envoy.filters.http.ext_proc"
# The filters that call the tollway cluster, and how a route turns each off.
TOLLWAY_FILTERS: Final = {
    EXT_AUTHZ: "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
    EXT_PROC: "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
}
_ROUTE: Final = re.compile(r"^(?P<indent> *)route: \{ cluster: upstream \}\n", re.M)
_FILTERS: Final = re.compile(r"^(?P<indent> *)http_filters:\n(?P<item> *)- ", re.M)
_FILTER_NAME: Final = re.compile(r"^ *- name: (envoy\.filters\.http\.\w+)", re.M)


def _once(pattern: re.Pattern[str], replace: str, text: str, what: str) -> str:
    text, count = pattern.subn(lambda m: replace.format(**m.groupdict()), text)
    if count != 1:
        raise ValueError(f"deploy/envoy.yaml: expected one {what}, found {count}")
    return text


def tollway_filters(template: str) -> list[str]:
    """The Tollway filters deploy/envoy.yaml runs, in order (ext_authz at least)."""
    found = [name for name in _FILTER_NAME.findall(template) if name in TOLLWAY_FILTERS]
    if EXT_AUTHZ not in found:
        raise ValueError(f"deploy/envoy.yaml: no {EXT_AUTHZ} filter")
    return found


def _filter_item(name: str) -> re.Pattern[str]:
    """One `- name: <name>` item of a filter list: the comment lines just above it,
    its first line and every line indented deeper than its dash."""
    return re.compile(
        rf"^(?P<indent> *)(?:#.*\n(?P=indent))*- name: {re.escape(name)}\n(?:(?P=indent) +\S.*\n)*",
        re.M,
    )


def render(
    template: str,
    *,
    listen: int,
    admin: int,
    authorizer: int,
    authz: bool,
    without: Collection[str] = (),
) -> str:
    """deploy/envoy.yaml turned into a bench config (authz False: the ceiling),
    minus the Tollway filters in `without` (any but ext_authz)."""
    present = tollway_filters(template)
    if EXT_AUTHZ in without or not set(without) <= set(present):
        raise ValueError(f"cannot leave out {sorted(without)}: deploy/envoy.yaml runs {present}")
    text = render_envoy_config(template, listen=listen, admin=admin, sidecar=authorizer)
    for name in without:
        text = _once(_filter_item(name), "", text, f"'- name: {name}' filter")
    route = '{indent}direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}\n'
    if not authz:
        route += "{indent}typed_per_filter_config:\n"
        for name in present:
            if name in without:
                continue
            route += (
                f"{{indent}}  {name}:\n"
                f'{{indent}}    "@type": type.googleapis.com/{TOLLWAY_FILTERS[name]}\n'
                "{indent}    disabled: true\n"
            )
    text = _once(_ROUTE, route, text, "'route: { cluster: upstream }'")
    copy_key = (
        "{indent}http_filters:\n"
        "{item}- name: envoy.filters.http.header_mutation\n"
        "{item}  typed_config:\n"
        '{item}    "@type": type.googleapis.com/'
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n"
        "{item}    mutations:\n"
        "{item}      request_mutations:\n"
        "{item}        - append:\n"
        "{item}            header: {{ key: x-api-key, value: "
        f'"%QUERY_PARAM({KEY_QUERY_PARAM})%"'
        " }}\n"
        "{item}            append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        "{item}- "
    )
    return _once(_FILTERS, copy_key, text, "'http_filters:' list")
