"""Config fields shared by the methods that act on linear layers chosen by role or name."""

from __future__ import annotations

import dataclasses

from efficientgpt.config import ConfigBase, field


@dataclasses.dataclass
class TargetedConfig(ConfigBase):
    """Where a method attaches: roles or module-name patterns, layers, exclusions."""

    targets: list[str] = field(["q", "v"], "roles (q,k,v,o,gate,up,down; groups all-linear, attn-linear, "
                                           "mlp-linear), module-name suffixes, or re:REGEX patterns")
    layers: list[int] | None = field(None, "only these decoder layers (default: all)")
    exclude: list[str] = field([], "drop targets whose module path matches one of these patterns")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
        if not self.targets:
            from efficientgpt.errors import ConfigError

            raise ConfigError(f"{type(self).__name__}.targets is empty; give at least one role or module pattern")
