"""Composite strategies ``<plugin>+<host>``: a plug-in wraps the model, the host strategy adapts the wrapped model.

A plug-in (so far only ``lsa``, the label-shift adapter) gives the host a model whose forward already carries the
plug-in's correction, so any host that calls ``self.model(x)`` works unchanged; after each ``adapt`` step the
plug-in sees the prediction (e.g. to update an online estimate). The plug-in's state lives in the wrapper module,
which is inside the host's model, so the host's own checkpoint / reset carry it.

Hyperparameters of ``lsa+tent`` (see :func:`split_hparams`): nested per part, ``{"lsa": {...}, "tent": {...}}``
(CLI: ``--set strategy.lsa.ema=0.9 --set strategy.tent.lr=1e-4``), or flat keys, each routed to the one part
that takes it (``create("lsa+tent", m, ema=0.9, lr=1e-4)``; a flat key wins over the same nested key);
``seed`` goes to every part.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ctta.config import strategy_defaults
from ctta.errors import ConfigError, UnsupportedError
from ctta.hparams import check_call
from ctta.registry import first_paragraph

from .base import STRATEGIES, Strategy


class Plugin:
    """What a plug-in provides to a composite; subclasses are listed in :data:`PLUGINS` by name."""

    name: ClassVar[str] = ""
    default_host: ClassVar[str] = "tent"

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the host will adapt (it must compute the plug-in's correction in ``forward``)."""
        raise NotImplementedError

    def observe(self, logits: Tensor) -> None:
        """Called with the prediction of every ``adapt`` step (no host sync allowed)."""

    @classmethod
    def refuse_host_class(cls, host_cls: type) -> Optional[str]:
        """Why this plug-in cannot compose with strategy class ``host_cls`` (checked without building it), or None."""
        return static_refusal(cls.name, host_cls)

    def refuse_host(self, host: Strategy) -> Optional[str]:
        """Why the built ``host`` cannot carry the plug-in (e.g. it trains or copies the wrapper), or None."""
        return None


# name -> plug-in class (its __init__(model, **hparams) takes the plug-in's hyperparameters); filled on import
PLUGINS: Dict[str, Callable[..., Plugin]] = {}


def register_plugin(cls: type) -> type:
    PLUGINS[cls.name] = cls
    return cls


def static_refusal(plugin: str, host_cls: type) -> Optional[str]:
    """A plug-in composes with test-time strategies only: adapt steps, the ``tta`` setting, no labelled steps."""
    host = getattr(host_cls, "name", "?")
    if issubclass(host_cls, Composite):
        return f"{host!r} is itself a composite; compose one plug-in with one host"
    if getattr(host_cls, "plugin_refusal", None):
        return f"{host!r}: {host_cls.plugin_refusal}"
    if "train" in host_cls.step_kinds or "adapt" not in host_cls.step_kinds or "tta" not in host_cls.settings:
        return (f"{host!r} is not a test-time strategy (it has {'/'.join(sorted(host_cls.step_kinds))} steps, "
                f"settings {', '.join(sorted(host_cls.settings))}); {plugin!r} composes only with strategies "
                f"that adapt on unlabelled batches in the 'tta' setting")
    return None


def parse_name(name: str) -> Tuple[str, str]:
    """``"lsa+tent"`` -> ("lsa", "tent"); a bare plug-in name means its default host."""
    parts = [p.strip() for p in str(name).split("+")]
    if len(parts) == 1 and parts[0] in PLUGINS:
        return parts[0], PLUGINS[parts[0]].default_host
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"composite strategy {name!r} must look like PLUGIN+HOST, e.g. lsa+tent")
    plugin, host = parts
    if plugin not in PLUGINS:
        raise ConfigError(f"composite strategy {name!r}: {plugin!r} is not a plug-in; "
                          f"plug-ins: {', '.join(sorted(PLUGINS)) or 'none'} (e.g. lsa+tent)")
    return plugin, host


def is_composite_name(name: str) -> bool:
    return "+" in str(name) or str(name) in PLUGINS


def host_class(plugin: str, host: str) -> type:
    """The host's class, or a one-line UnsupportedError/UnknownNameError saying why ``plugin+host`` is refused."""
    if host in PLUGINS:
        raise UnsupportedError(f"strategy {plugin + '+' + host!r}: {host!r} is a plug-in, not a host strategy")
    cls = STRATEGIES.get(host)
    reason = PLUGINS[plugin].refuse_host_class(cls)  # type: ignore[attr-defined]
    if reason:
        raise UnsupportedError(f"strategy {plugin + '+' + host!r} is refused: {reason}")
    return cls


def _accepted(fn: Callable[..., Any], skip: Tuple[str, ...] = ("self", "model")) -> List[str]:
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def split_hparams(plugin: str, host: str, host_cls: type, hparams: Dict[str, Any]) -> Tuple[dict, dict]:
    """Nested ``{plugin: {...}, host: {...}}`` plus flat keys routed to the one part that takes them (``seed`` and
    ``source_data`` to both when both take them)."""
    plug_keys = _accepted(PLUGINS[plugin].__init__)
    host_keys = _accepted(host_cls.__init__)
    parts: Dict[str, dict] = {plugin: {}, host: {}}
    flat = {}
    for k, v in hparams.items():
        if k in parts and isinstance(v, dict):
            parts[k] = {**parts[k], **v}
        else:
            flat[k] = v
    for k, v in flat.items():
        if k == "seed" or (k == "source_data" and k in plug_keys and k in host_keys):
            # one seed, and the one source data set (common/source_data.py) both parts read (e.g. lsa+eata)
            parts[plugin][k] = parts[host][k] = v
            continue
        where = [p for p, keys in ((plugin, plug_keys), (host, host_keys)) if k in keys]
        if not where:
            raise ConfigError(f"strategy {plugin + '+' + host!r} has no hyperparameter {k!r}; {plugin} takes: "
                              f"{', '.join(plug_keys)}; {host} takes: {', '.join(host_keys)}")
        if len(where) == 2:
            raise ConfigError(f"strategy {plugin + '+' + host!r}: hyperparameter {k!r} belongs to both {plugin} and "
                              f"{host}; give it as {plugin}.{k} or {host}.{k}")
        parts[where[0]][k] = v
    for part, keys in ((plugin, plug_keys), (host, host_keys)):
        unknown = sorted(set(parts[part]) - set(keys))
        if unknown:
            raise ConfigError(f"strategy {plugin + '+' + host!r}: {part} has no hyperparameter "
                              f"{', '.join(map(repr, unknown))}; it takes: {', '.join(keys)}")
    return parts[plugin], parts[host]


class Composite(Strategy):
    """``plugin+host``: the host strategy runs on the plug-in's wrapped model; the plug-in observes each prediction."""

    plugin_name: ClassVar[str] = ""
    host_name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, plugin: Plugin, host_cls: type, host_hparams: Dict[str, Any],
                 seed: int = 0) -> None:
        wrapped = plugin.wrap(model)
        super().__init__(wrapped, seed)
        self.plugin = plugin
        self.name = f"{plugin.name}+{host_cls.name}"  # type: ignore[misc]  (the engine's name of the run)
        self.step_kinds = host_cls.step_kinds  # type: ignore[misc]
        self.settings = host_cls.settings  # type: ignore[misc]
        self.host: Strategy = host_cls(wrapped, **host_hparams)
        reason = plugin.refuse_host(self.host)
        if reason:
            raise UnsupportedError(f"strategy {self.name!r} is refused: {reason}")

    # the three calls: the host decides, the plug-in watches
    def predict(self, x: Tensor) -> Tensor:
        return self.host.predict(x)

    def adapt(self, x: Tensor) -> Tensor:
        logits = self.host.adapt(x)
        self.plugin.observe(logits)
        return logits

    # state: the wrapper (with the plug-in's state) is inside the host's model, so the host carries everything
    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.host.trainable_parameters()

    def generator(self, device: Any) -> Any:
        return self.host.generator(device)

    def reset(self) -> None:
        self.host.reset()

    def checkpoint_state(self) -> Dict[str, Any]:
        return {"host": self.host.checkpoint_state()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        self.host.load_checkpoint_state(state["host"])


def _composite_parts(name: str, hparams: Dict[str, Any]) -> Tuple[str, str, type, dict, dict]:
    """plug-in, host, host class and each part's hyperparameters (packaged defaults, then ``hparams``), checked."""
    plugin, host = parse_name(name)
    cls = host_class(plugin, host)
    merged = {plugin: strategy_defaults(plugin), host: strategy_defaults(host)}
    nested = {k: v for k, v in hparams.items() if k in (plugin, host) and isinstance(v, dict)}
    flat = {k: v for k, v in hparams.items() if k not in nested}
    for k, v in nested.items():
        merged[k] = {**merged[k], **v}
    plug_hp, host_hp = split_hparams(plugin, host, cls, {**merged, **flat})
    plug_hp = check_call(PLUGINS[plugin].__init__, plug_hp, f"strategy {name!r} ({plugin})")
    host_hp = check_call(cls.__init__, host_hp, f"strategy {name!r} ({host})")
    return plugin, host, cls, plug_hp, host_hp


def check_composite(name: str, hparams: Dict[str, Any]) -> Dict[str, Any]:
    """The checked hyperparameters of ``plugin+host``, nested per part, without building anything."""
    plugin, host, _, plug_hp, host_hp = _composite_parts(name, hparams)
    return {plugin: plug_hp, host: host_hp}


def create_composite(name: str, model: nn.Module, hparams: Dict[str, Any]) -> Composite:
    """Build ``plugin+host`` around ``model``: packaged defaults of each part, then ``hparams`` (nested or flat)."""
    plugin, host, cls, plug_hp, host_hp = _composite_parts(name, hparams)
    seed = host_hp.get("seed", plug_hp.get("seed", 0))
    plug = PLUGINS[plugin](model, **plug_hp)
    composite = Composite(model, plug, cls, host_hp, seed=seed)
    composite.hparams = {plugin: plug_hp, host: host_hp}
    return composite


def composable_hosts(plugin: str) -> List[str]:
    """Registered strategies that ``plugin`` composes with, judged by their class (building may still refuse)."""
    out = []
    for n in STRATEGIES.names():
        cls = STRATEGIES.get(n)
        if n in PLUGINS or not isinstance(cls, type) or not issubclass(cls, Strategy) or "+" in n:
            continue
        if PLUGINS[plugin].refuse_host_class(cls) is None:  # type: ignore[attr-defined]
            out.append(n)
    return out


def register_composites() -> None:
    """Register ``plugin+host`` for every plug-in and host that fit (and the bare plug-in name for its default)."""
    for plugin in sorted(PLUGINS):
        for host in composable_hosts(plugin):
            name = f"{plugin}+{host}"
            if name in STRATEGIES:
                continue
            cls = type(f"Composite_{plugin}_{host}", (Composite,), {
                "name": name, "plugin_name": plugin, "host_name": host,
                "step_kinds": STRATEGIES.get(host).step_kinds, "settings": STRATEGIES.get(host).settings,
                "__doc__": f"{plugin} plug-in ({first_paragraph(PLUGINS[plugin].__doc__ or '').rstrip('.')}) on the "
                           f"{host} strategy."})
            STRATEGIES.register(name, cls)
        default = f"{plugin}+{PLUGINS[plugin].default_host}"
        if plugin not in STRATEGIES and default in STRATEGIES:
            STRATEGIES.register(plugin, STRATEGIES.get(default),
                                help=f"{plugin} plug-in on its default host: {default}.")
