"""Chat templates rendered by lowrank.io.chat_template against transformers' apply_chat_template,
for ChatML (SmolLM2's, in tokenizer_config.json, and a Qwen-style one in chat_template.jinja),
Llama 3's and Mistral's public templates, on the tokenizer folders test_tokenizer builds."""
from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from lowrank.io.chat_template import compile_chat_template, render_chat_template
from lowrank.io.tokenizer import Tokenizer
from test_tokenizer import chatml_folder, llama3_folder, sentencepiece_folder

# SmolLM2-Instruct's template (a default system prompt when none is given).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# ChatML written over several indented lines: trim_blocks and lstrip_blocks decide its whitespace.
CHATML_FILE = """\
{% for message in messages %}
    {% if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Mistral-7B-Instruct's template (v0.2/v0.3 form: a system message joins the first user turn).
MISTRAL = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# transformers' extras: tojson (non-ASCII kept), loop controls, namespace, tools.
EXTRAS = """\
{%- set ns = namespace(count=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
{{ ns.count }}:{{ message | tojson }}
    {%- if ns.count == 3 %}{% break %}{% endif %}
{%- endfor %}
{%- if tools %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}
{%- if add_generation_prompt %} >{% endif %}"""

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français 🇫🇷."}
TURNS = [{"role": "user", "content": "Hi! 👋  What's 2+2?"},
         {"role": "assistant", "content": "  4, naïvely.\n"},
         {"role": "user", "content": "And <|im_end|> spelled out, \"quoted\"\tand tabbed?"}]
CONVERSATIONS = [TURNS[:1], TURNS, [SYSTEM] + TURNS, [SYSTEM] + TURNS[:1]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"chatml": chatml_folder(root / "chatml", chat_template=CHATML),
            "chatml_file": chatml_folder(root / "chatml_file", template_file=CHATML_FILE, chat_template=CHATML),
            "llama3": llama3_folder(root / "llama3", chat_template=LLAMA3),
            "mistral": sentencepiece_folder(root / "mistral", chat_template=MISTRAL),
            "extras": chatml_folder(root / "extras", template_file=EXTRAS)}


@pytest.mark.parametrize("name", ["chatml", "chatml_file", "llama3", "mistral", "extras"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_matches_apply_chat_template(folders, name, add_generation_prompt):
    ours, theirs = Tokenizer.from_pretrained(folders[name]), AutoTokenizer.from_pretrained(folders[name])
    for messages in CONVERSATIONS:
        kwargs = dict(add_generation_prompt=add_generation_prompt)
        if name == "extras":
            kwargs["tools"] = [{"name": "météo", "parameters": {"ville": "Zürich"}}]
        text = theirs.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == text
        ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
        assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == ids
        assert ours.decode(ids) == text     # no special token added twice (a template writes its own BOS)


FILE_RENDERED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nHi! 👋  What's 2+2?<|im_end|>\n")


def test_chat_template_file_comes_before_the_config_field(folders):
    tok = Tokenizer.from_pretrained(folders["chatml_file"])
    assert tok.chat_template_file.endswith("chat_template.jinja")
    assert tok.apply_chat_template(TURNS[:1]) == FILE_RENDERED


def test_trim_and_lstrip_blocks_are_on():
    """The indented, multi-line template renders without the newlines and indents plain jinja2 keeps."""
    assert render_chat_template(CHATML_FILE, TURNS[:1]) == FILE_RENDERED
    assert jinja2.Environment().from_string(CHATML_FILE).render(messages=TURNS[:1]) != FILE_RENDERED


def test_messages_with_none_values_drop_those_keys():
    template = "{% for m in messages %}{{ m.role }}:{{ 'has' if 'tool_calls' in m else 'none' }};{% endfor %}"
    assert render_chat_template(template, [{"role": "user", "content": "x", "tool_calls": None}]) == "user:none;"


def test_raise_exception_is_one_line_naming_the_file(folders):
    tok = Tokenizer.from_pretrained(folders["mistral"])
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    message = str(info.value)
    assert "\n" not in message and "tokenizer_config.json: chat_template" in message
    assert "conversation roles must alternate" in message
    with pytest.raises(ValueError, match=r"chat_template.jinja: .*raised: bad role tool"):
        folder = folders["extras"]
        (folder / "chat_template.jinja").write_text("{{ raise_exception('bad role ' + messages[0].role) }}")
        Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "tool", "content": ""}])
    (folders["extras"] / "chat_template.jinja").write_text(EXTRAS)
    with pytest.raises(ValueError, match=r"chat_template.jinja: line 2: not a valid Jinja template"):
        render_chat_template("ok\n{% for %}", TURNS, where="chat_template.jinja")


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update(role='x') }}",
])
def test_the_sandbox_refuses_unsafe_access(template):
    with pytest.raises(ValueError, match="chat_template.jinja: the sandbox refused") as info:
        render_chat_template(template, TURNS, where="chat_template.jinja")
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_templates_compile_once():
    assert compile_chat_template(CHATML) is compile_chat_template(CHATML)


def test_a_tokenizer_without_template_says_so(tmp_path):
    tok = Tokenizer.from_pretrained(chatml_folder(tmp_path))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(TURNS)


def test_named_templates_in_the_config_use_default(tmp_path):
    """tokenizer_config.json's list form [{"name", "template"}]: "default" renders, as in transformers."""
    folder = chatml_folder(tmp_path, chat_template=[{"name": "default", "template": LLAMA3},
                                                    {"name": "tool_use", "template": CHATML}])
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(TURNS, tokenize=False)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.apply_chat_template(TURNS) == expected and tok.chat_template_file.endswith("chat_template['default']")
    bad = chatml_folder(tmp_path / "bad", chat_template=["{{ messages }}"])
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template: a list of chat templates"):
        Tokenizer.from_pretrained(bad)


def test_globals_strftime_now_dict_and_plain_values():
    import datetime
    import numpy as np
    template = ("{{ strftime_now('%Y-%m') }}|{{ dict(a=1) | tojson }}|{{ dict.fromkeys(['x']) | tojson }}|"
                "{{ messages[0].flag }}|{{ messages[0].n + 1 }}|{{ messages[0].obj }}")
    messages = [{"role": "user", "flag": np.bool_(False), "n": np.int64(41), "obj": object()}]
    expected = f"{datetime.datetime.now():%Y-%m}|{{\"a\": 1}}|{{\"x\": null}}|False|42|<object>"
    assert render_chat_template(template, messages) == expected
