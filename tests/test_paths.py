"""Rule paths: exact, prefix glob, template; trailing slashes cannot slip past."""

from __future__ import annotations

import pytest

from ratelimit import ConfigError
from ratelimit.policy.paths import PathPattern, route_path


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/v1/models", "/v1/models", True),
        ("/v1/models", "/v1/models/", True),
        ("/v1/models", "/v1/models2", False),
        ("/v1/models", "/v1", False),
        ("/v1/*", "/v1", True),
        ("/v1/*", "/v1/", True),
        ("/v1/*", "/v1/chat/completions", True),
        ("/v1/*", "/v10/chat", False),
        ("/*", "/", True),
        ("/*", "/anything/at/all", True),
        ("/users/{id}", "/users/42", True),
        ("/users/{id}", "/users/42/", True),
        ("/users/{id}", "/users/", False),
        ("/users/{id}", "/users/4/2", False),
        ("/users/{id}/keys", "/users/7/keys", True),
        ("/files/{rest:path}", "/files/a/b/c", True),
        ("/files/{rest:path}", "/files/", True),
        ("/files/{rest:path}", "/files", True),
        ("/files/{rest:path}", "/files//x", True),
        ("/files/{rest:path}", "/filesx", False),
        ("/files/{rest:path}", "/file/", False),
        ("/files/{rest:path}/meta", "/files//meta", True),
        ("/files/{rest:path}/meta", "/files/a/b/meta", True),
        ("/files/{rest:path}/meta", "/files/meta", False),
        ("/{rest:path}", "/", True),
        ("/{rest:path}", "/any/thing", True),
        ("/orgs/{org}/*", "/orgs/acme/repos/x", True),
        ("/a.b", "/aXb", False),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    """Each pattern form matches exactly the paths it should."""
    assert PathPattern(pattern).matches(path) is matches


@pytest.mark.parametrize("bad", ["v1/models", "/v1/*/x", "/v1*", "/users/{id", "/u/{}", 7])
def test_bad_patterns_fail_naming_the_field(bad: object) -> None:
    """A malformed path fails at construction with the field name."""
    with pytest.raises(ConfigError, match=r"^path: expected"):
        PathPattern(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "root_path", "routed"),
    [
        ("/api/v1/models", "/api", "/v1/models"),
        ("/api/", "/api", "/"),
        ("/api", "/api", ""),
        ("/apix/v1/models", "/api", "/apix/v1/models"),
        ("/v1/models", "/api", "/v1/models"),
        ("/api/api/v1", "/api", "/api/v1"),
        ("/a/b/c", "/a/b", "/c"),
        ("/api/x", "/api/", "/api/x"),
    ],
)
def test_route_path_is_relative_to_root_path_as_starlette_routes(
    path: str, root_path: str, routed: str
) -> None:
    """The routed path drops `root_path` only when it is a whole leading segment run."""
    assert route_path(path, root_path) == routed
