"""Chat templates, rendered as transformers' ``apply_chat_template`` renders them.

The template is ``chat_template.jinja`` in the model folder, else ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of {"name", "template"} of which "default" is used).
It runs in jinja2's ``ImmutableSandboxedEnvironment`` (a template is untrusted code: no
attribute starting with "_", no mutating lists or dicts passed in) with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension (``break``/``continue``), and transformers' extras:
``raise_exception(message)``, ``strftime_now(format)``, a ``tojson`` filter that leaves
non-ASCII unescaped, a ``namespace`` that refuses names starting with "_", a ``dict`` that is a
function rather than the type, and a ``{% generation %}`` block (rendered as its body). It sees
``messages`` (plain JSON values only), ``add_generation_prompt``, ``tools``, ``documents`` and the
special tokens (``bos_token``, ``eos_token``, ...). Any failure is a one-line ValueError naming
the template's file.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_chat_template(folder, config: dict) -> tuple[str | None, str]:
    """(template or None, where it came from) for a model folder and its tokenizer_config.json."""
    folder = Path(folder)
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    where = f"{folder / 'tokenizer_config.json'}: chat_template"
    template = config.get("chat_template")
    if isinstance(template, list):          # [{"name": ..., "template": ...}, ...]: several named templates
        if not all(isinstance(t, dict) and "name" in t and "template" in t for t in template):
            raise ValueError(f"{where}: a list of chat templates must hold {{'name', 'template'}} objects")
        named = {t["name"]: t["template"] for t in template}
        template, where = named.get("default"), f"{where}['default']"
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: expected a Jinja template string, got {type(template).__name__}")
    return template, where


def raise_exception(message):
    """The template's own error: ``{{ raise_exception('Roles must alternate') }}``."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON without jinja's HTML escaping, non-ASCII kept, as transformers' filter writes it."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    """Today's date in the template, e.g. Llama 3.1's ``strftime_now('%d %b %Y')``."""
    return datetime.now().strftime(format)


class Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace()`` that refuses names starting with "_" (a way out of the sandbox)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace may not hold the name {name!r}")


class TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` in a template, without handing it the ``dict`` type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """A template string -> a compiled jinja2 Template in transformers' sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=TemplateDict())
    return env.from_string(template)


def plain(value):
    """Only JSON types reach the template: subclasses become their base type, other objects "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):       # np.bool_(False) would otherwise be a truthy "<bool_>"
        return plain(value.item())
    return f"<{type(value).__name__}>"


def render_chat_template(template: str, messages: list[dict], where: str = "chat_template",
                         add_generation_prompt: bool = False, tools=None, documents=None, **variables) -> str:
    """``messages`` ([{"role", "content"}, ...]) -> the rendered prompt; keys whose value is None
    are dropped from each message, as transformers drops them. ValueError naming ``where`` when the
    template does not compile, raises, or is refused by the sandbox."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of dicts, got {messages!r}")
    if not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"{where}: each message must be a dict with 'role' and 'content', got {messages!r}")
    messages = [plain({k: v for k, v in m.items() if v is not None}) for m in messages]
    try:
        compiled = compile_chat_template(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{where}: line {e.lineno}: not a valid Jinja template: {e.message}") from e
    try:
        return compiled.render(messages=messages, tools=plain(tools), documents=plain(documents),
                               add_generation_prompt=add_generation_prompt, **plain(variables))
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"{where}: the sandbox refused the chat template: {one_line(e)}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"{where}: the chat template raised: {one_line(e)}") from e
    except Exception as e:                  # a template is code: its TypeErrors and KeyErrors are the file's fault
        raise ValueError(f"{where}: the chat template failed: {type(e).__name__}: {one_line(e)}") from e


def one_line(error: Exception) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split())
