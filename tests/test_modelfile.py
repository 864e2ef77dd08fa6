"""Ollama Modelfiles: rendering, and the validator against the behaviour of Ollama's own parser
(the expectations below are those of ollama/ollama parser/parser_test.go and api/types.go)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from loraforge.constants import CHATML_GO_TEMPLATE
from loraforge.modelfile import (
    DEFAULT_STOP,
    ModelfileError,
    check_modelfile,
    modelfile_for_model,
    parse_modelfile,
    render_modelfile,
    stop_tokens,
    template_errors,
    validate_modelfile,
    write_modelfile,
)

def write_gguf(path):
    """A real (tensor-less) GGUF, written by gguf-py as llama.cpp's converter writes one."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SYSTEM = ("You are an expert Ruby on Rails architect. You prefer concerns\n"
          "over service objects, CRUD-only controllers, \"state-as-records\".")


def ollama_view(text):
    """(Ollama's command name, args) pairs, as parser.ParseFile returns them."""
    out = []
    for c in parse_modelfile(text):
        out.append((c.name, c.value if c.instruction != "MESSAGE" else c.args))
    return out


# --------------------------------------------------------------------------------------
# the parser, case by case as Ollama's parser_test.go has them
# --------------------------------------------------------------------------------------

def test_parse_basic_file():
    text = (
        "\nFROM model1\nADAPTER adapter1\nLICENSE MIT\nPARAMETER param1 value1\nPARAMETER param2 value2\n"
        'TEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
        '{{ end }}{{ .Response }}<|eot_id|>"""    \n'
    )
    assert ollama_view(text) == [
        ("model", "model1"), ("adapter", "adapter1"), ("license", "MIT"), ("param1", "value1"),
        ("param2", "value2"),
        ("template", "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
                     "{{ end }}{{ .Response }}<|eot_id|>"),
    ]
    cmds = parse_modelfile(text)
    assert cmds[0] == ("FROM", "model1") and cmds[0].line == 2
    assert cmds[3] == ("PARAMETER", "param1 value1") and cmds[3].key == "param1" and cmds[3].line == 5


def test_parse_trims_space_but_keeps_quoted_space():
    text = ('\nFROM "     model 1"\nADAPTER      adapter3\nLICENSE "MIT       "\nPARAMETER param1        value1\n'
            'TEMPLATE """   {{ .Prompt }}   """    \n')
    assert ollama_view(text) == [("model", "     model 1"), ("adapter", "adapter3"), ("license", "MIT       "),
                                 ("param1", "value1"), ("template", "   {{ .Prompt }}   ")]


@pytest.mark.parametrize("text, expected", [
    ('FROM "FOO  BAR  "', [("model", "FOO  BAR  ")]),
    ('FROM "FOO BAR"\nPARAMETER param1 value1', [("model", "FOO BAR"), ("param1", "value1")]),
    ("FROM     FOOO BAR    ", [("model", "FOOO BAR")]),
    ("FROM /what/is/the path ", [("model", "/what/is/the path")]),
    ("FROM llama3:7b-instruct-q4_K_M", [("model", "llama3:7b-instruct-q4_K_M")]),
    ("PARAMETER param1 value1\nFROM foo", [("param1", "value1"), ("model", "foo")]),
    ("PARAMETER what the \nFROM lemons make lemonade ", [("what", "the"), ("model", "lemons make lemonade")]),
    ("\n# comment\nFROM foo\n\t", [("model", "foo")]),
    ("from foo\nsystem hi\nParameter stop x", [("model", "foo"), ("system", "hi"), ("stop", "x")]),
    ("\nFROM base\nDRAFT ./assistant\n", [("model", "base"), ("draft", "./assistant")]),
    ("\nFROM foo\nRENDERER renderer1\nPARSER parser1\nREQUIRES 0.14.0\n",
     [("model", "foo"), ("renderer", "renderer1"), ("parser", "parser1"), ("requires", "0.14.0")]),
])
def test_parse_from_cases(text, expected):
    assert ollama_view(text) == expected


@pytest.mark.parametrize("text", ["", "PARAMETER param1 value1", "# FROM foo\n"])
def test_missing_from(text):
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse_modelfile(text)


@pytest.mark.parametrize("text, expected", [
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t', "\nThis is a\nmultiline system.\n"),
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n', "\nThis is a\nmultiline system."),
    ('\nFROM foo\nSYSTEM """This is a multiline system."""\n', "This is a multiline system."),
    ('\nFROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     '\nThis is a multiline system with "quotes".\n'),
    ('\nFROM foo\nSYSTEM """"""\n', ""),
    ('\nFROM foo\nSYSTEM ""\n', ""),
    ("\nFROM foo\nSYSTEM \"'\"\n", "'"),
    ('\nFROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n', '\'\'"\'""\'""\'"\'\'\'\'\'""\'""\''),
    ('\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""', "\n{{ .Prompt }}\n"),
])
def test_parse_quoted(text, expected):
    assert ollama_view(text)[1][1] == expected


@pytest.mark.parametrize("text", [
    '\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t',
    '\nFROM foo\nSYSTEM "\n\t\t\t',
    '\nFROM foo\nSYSTEM """\nnever closed\n',
    "\nFROM foo\nPARAMETER param1\n",
    "\nFROM foo\nMESSAGE system\n",
    "\nFROM foo\nMESSAGE system",
    "FROM foo\nPARAMETER top-p 0.9\n",
])
def test_unexpected_eof(text):
    with pytest.raises(ModelfileError, match="unexpected EOF"):
        parse_modelfile(text)
    assert validate_modelfile(text) and "unexpected EOF" in validate_modelfile(text)[0]


def test_errors_carry_line_numbers():
    with pytest.raises(ModelfileError) as e:
        parse_modelfile("\nFROM foo\nBADCOMMAND param1 value1\n")
    assert e.value.line == 3 and "command must be one of" in str(e.value) and str(e.value).startswith("line 3:")
    with pytest.raises(ModelfileError) as e:
        parse_modelfile("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n")
    assert e.value.line == 3 and 'message role must be one of "system", "user", or "assistant"' in str(e.value)
    errors = validate_modelfile('FROM foo\n\nSYSTEM """\nstill open\n\nPARAMETER x 1\n')
    assert len(errors) == 1 and "line 7" in errors[0] and "SYSTEM on line 3" in errors[0]


def test_messages():
    text = ('\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\nMESSAGE user Hey there!\n'
            'MESSAGE assistant """\nHello, I want to parse all the things!\n"""\n')
    assert ollama_view(text) == [
        ("model", "foo"), ("message", "system: You are a file parser. Always parse things."),
        ("message", "user: Hey there!"), ("message", "assistant: \nHello, I want to parse all the things!\n")]
    msg = parse_modelfile(text)[1]
    assert msg.instruction == "MESSAGE" and msg.key == "system" and msg.value.startswith("You are")


@pytest.mark.parametrize("line, value", [
    ("stop ### User:", "### User:"), ("stop ### User: ", "### User:"), ('stop "### User:"', "### User:"),
    ('stop "### User: "', "### User: "), ('stop """### User:"""', "### User:"),
    ('stop """### User:\n"""', "### User:\n"), ("stop <|endoftext|>", "<|endoftext|>"), ("stop </s>", "</s>"),
])
def test_stop_values(line, value):
    assert ollama_view(f"FROM foo\nPARAMETER {line}\n")[1] == ("stop", value)


def test_utf16_and_bom():
    text = "FROM bob\nPARAMETER num_ctx 4096\nSYSTEM You are a utf16 file.\n"
    for data in (b"\xff\xfe" + text.encode("utf-16-le"), b"\xfe\xff" + text.encode("utf-16-be"),
                 b"\xef\xbb\xbf" + text.encode()):
        assert ollama_view(data) == [("model", "bob"), ("num_ctx", "4096"), ("system", "You are a utf16 file.")]


# --------------------------------------------------------------------------------------
# what `ollama create` checks after parsing
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("param", [
    "num_ctx 1", "num_batch 1", "num_gpu 1", "main_gpu 1", "use_mmap true", "num_thread 1", "num_keep 1",
    "seed -1", "num_predict 1", "top_k 1", "top_p 1.0", "min_p 0.05", "typical_p 1.0", "repeat_last_n 1",
    "temperature 1.0", "repeat_penalty 1.0", "presence_penalty 1.0", "frequency_penalty 1.0",
    "temperature .5", "temperature 1e-3", "top_p 1", "use_mmap F", "stop ### User:", "stop <|im_end|>",
])
def test_known_parameters(param):
    assert validate_modelfile(f"FROM foo\nPARAMETER {param}\n") == []


@pytest.mark.parametrize("param, message", [
    ("num_gqa 1", "unknown parameter 'num_gqa'"),
    ("numa true", "unknown parameter 'numa'"),
    ("Temperature 0.4", "unknown parameter 'Temperature'"),
    ("tfs_z 1.0", "unknown parameter 'tfs_z'"),
    ("num_ctx 4k", "invalid int value [4k]"),
    ("num_ctx 4096.0", "invalid int value [4096.0]"),
    ("num_ctx 1_000", "invalid int value [1_000]"),
    ("temperature warm", "invalid float value [warm]"),
    ("temperature 1e39", "invalid float value [1e39]"),
    ("use_mmap yes", "invalid bool value [yes]"),
])
def test_parameter_errors(param, message):
    errors = validate_modelfile(f"FROM foo\n# a comment\nPARAMETER {param}\n")
    assert errors == [f"line 3: {message}"]


def test_deprecated_parameters_only_warn():
    errors, warnings = check_modelfile("FROM foo\nPARAMETER mirostat 2\nPARAMETER penalize_newline true\n")
    assert errors == [] and len(warnings) == 2 and "mirostat is deprecated" in warnings[0]


def test_requires_semver():
    assert validate_modelfile("FROM foo\nREQUIRES 0.14.0\n") == []
    assert validate_modelfile("FROM foo\nREQUIRES v0.14.0-rc1\n") == []
    assert validate_modelfile("FROM foo\nREQUIRES latest\n") == [
        "line 2: requires must be a valid semver (e.g. 0.14.0)"]


def test_files_must_exist_with_base_dir(tmp_path):
    write_gguf(tmp_path / "Q5_K_M.gguf")
    assert validate_modelfile("FROM ./Q5_K_M.gguf\n", base_dir=tmp_path) == []
    assert validate_modelfile(f"FROM {tmp_path / 'Q5_K_M.gguf'}\n", base_dir="/") == []
    errors = validate_modelfile("FROM ./Q4_K_M.gguf\nADAPTER ./lora\n", base_dir=tmp_path)
    assert len(errors) == 2 and "line 1: FROM ./Q4_K_M.gguf: no such file" in errors[0] and "ADAPTER" in errors[1]
    # a model name is pulled by Ollama, not a file
    assert validate_modelfile("FROM qwen3:8b\n", base_dir=tmp_path) == []
    # without base_dir, files are not checked
    assert validate_modelfile("FROM ./Q4_K_M.gguf\n") == []


def test_template_structure():
    assert template_errors(CHATML_GO_TEMPLATE) == []
    assert template_errors("{{ if .System }}x") == ["TEMPLATE has unclosed if block(s) (missing {{ end }})"]
    assert template_errors("x {{ end }}") == ["TEMPLATE has an unexpected {{ end }}"]
    assert "unbalanced" in template_errors("{{ .Prompt }")[0]
    errors = validate_modelfile('FROM foo\nTEMPLATE """{{ range .Messages }}{{ .Content }}"""\n')
    assert errors == ["line 2: TEMPLATE has unclosed range block(s) (missing {{ end }})"]


def test_chatml_without_stop_warns():
    text = f'FROM foo\nTEMPLATE """{CHATML_GO_TEMPLATE}"""\n'
    errors, warnings = check_modelfile(text)
    assert errors == [] and any("<|im_end|>" in w for w in warnings)


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------

def test_render_modelfile():
    text = render_modelfile("Q5_K_M.gguf", SYSTEM, 0.4, 0.8, 32768)
    cmds = parse_modelfile(text)
    assert cmds[0] == ("FROM", "./Q5_K_M.gguf")
    by = {}
    for c in cmds:
        by.setdefault(c.instruction, []).append(c)
    assert by["SYSTEM"][0].value == SYSTEM
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert by["TEMPLATE"][0].value == CHATML_GO_TEMPLATE
    params = [(c.key, c.value) for c in by["PARAMETER"]]
    assert params == [("temperature", "0.4"), ("top_p", "0.8"), ("num_ctx", "32768"), ("stop", "<|im_start|>"),
                      ("stop", "<|im_end|>"), ("stop", "<|endoftext|>")]
    assert validate_modelfile(text) == []
    assert check_modelfile(text) == ([], [])


def test_render_rejects_what_ollama_cannot_read():
    with pytest.raises(ValueError, match='"""'):
        render_modelfile("Q5_K_M.gguf", 'a """ b', 0.4, 0.8, 4096)
    with pytest.raises(ValueError, match="num_ctx"):
        render_modelfile("Q5_K_M.gguf", "x", 0.4, 0.8, 4096.0)
    # odd stop strings are quoted so they survive the parser
    text = render_modelfile("../x/Q4_K_M.gguf", None, 1, 0.95, 2048, stop=["### User: ", 'say "hi"', "a\nb"],
                            template=None)
    assert parse_modelfile(text)[0] == ("FROM", "../x/Q4_K_M.gguf")
    assert [c.value for c in parse_modelfile(text) if c.key == "stop"] == ["### User: ", 'say "hi"', "a\nb"]
    assert "TEMPLATE" not in text and "SYSTEM" not in text


@pytest.mark.slow
def test_stop_tokens_and_modelfile_for_tiny_model(tiny_bases, tmp_path):
    base = tiny_bases["qwen3"]
    assert stop_tokens(base) == list(DEFAULT_STOP)
    gguf = write_gguf(tmp_path / "Q5_K_M.gguf")
    mf = tmp_path / "Modelfile"
    text = modelfile_for_model(gguf, mf, base, system=SYSTEM, temperature=0.4, top_p=0.8, num_ctx=32768,
                               header="rails-coder-tiny\n  ollama create rails-coder-tiny -f Modelfile")
    assert text.startswith("# rails-coder-tiny\n#   ollama create")
    write_modelfile(mf, text)
    assert mf.read_text() == text and not (tmp_path / "Modelfile.partial").exists()
    assert validate_modelfile(mf.read_text(), base_dir=tmp_path) == []
    # the FROM must exist before the Modelfile is put in place
    with pytest.raises(ValueError, match="no such file"):
        write_modelfile(tmp_path / "sub" / "Modelfile", text)
    assert not (tmp_path / "sub" / "Modelfile").exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "not a GGUF file: a GGUF starts with the magic b'GGUF', it is empty"),
    (b"garbage", "not a GGUF file: a GGUF starts with the magic b'GGUF', it starts with b'garb'"),
    (b"GGUF", "not a GGUF file: 4 bytes, too short for a GGUF header"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16),
     "GGUF version 1, not one llama.cpp reads (2 to 3): the file is damaged or too old; convert the model again"),
    (b"GGUF" + (3).to_bytes(4, "big") + bytes(16),
     "a big-endian GGUF (version 3): llama.cpp and Ollama read little-endian ones"),
])
def test_check_modelfile_refuses_a_from_file_that_is_no_gguf(tmp_path, capsys, content, problem):
    from loraforge.cli import main

    (tmp_path / "Q5_K_M.gguf").write_bytes(content)
    (tmp_path / "adapter.gguf").write_bytes(content)
    mf = tmp_path / "Modelfile"
    mf.write_text(render_modelfile("Q5_K_M.gguf", SYSTEM, 0.4, 0.8, 32768))
    assert main(["check-modelfile", str(mf)]) == 1
    # one line naming the Modelfile, the FROM line, the file and what is wrong with it
    assert capsys.readouterr().out.splitlines() == [
        f"{mf}: line 1: FROM ./Q5_K_M.gguf: {problem} ({tmp_path / 'Q5_K_M.gguf'})", f"{mf}: 1 error(s)"]
    # an ADAPTER file is read by llama.cpp too; a safetensors adapter folder is not a file to check
    errors = validate_modelfile("FROM qwen3:8b\nADAPTER ./adapter.gguf\n", base_dir=tmp_path)
    assert len(errors) == 1 and errors[0].startswith("line 2: ADAPTER ./adapter.gguf: ") and problem in errors[0]
    (tmp_path / "lora").mkdir()
    assert validate_modelfile("FROM qwen3:8b\nADAPTER ./lora\n", base_dir=tmp_path) == []
    write_gguf(tmp_path / "Q5_K_M.gguf")
    assert main(["check-modelfile", str(mf)]) == 0


def test_stop_tokens_of_a_qwen_style_config(tmp_path):
    """A real Qwen folder: byte-level BPE, added_tokens_decoder, chat template in the config."""
    cfg = {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {
            "151643": {"content": "<|endoftext|>", "special": True},
            "151644": {"content": "<|im_start|>", "special": True},
            "151645": {"content": "<|im_end|>", "special": True},
            "151657": {"content": "<tool_call>", "special": False},
            "151659": {"content": "<|fim_prefix|>", "special": False},
        },
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                         "{% endfor %}<tool_call>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert stop_tokens(tmp_path) == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    assert stop_tokens(tmp_path / "missing") == list(DEFAULT_STOP)


def test_non_chatml_model_needs_explicit_template(tmp_path, capsys):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] {{ x }} [/INST]"}))
    with pytest.raises(ValueError, match="not ChatML"):
        modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", tmp_path, system=None,
                            temperature=0.4, top_p=0.8, num_ctx=4096)
    # no chat template at all: Qwen's ChatML is assumed, with a warning
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    text = modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", tmp_path, system=None,
                               temperature=0.4, top_p=0.8, num_ctx=4096)
    assert CHATML_GO_TEMPLATE in text and "assuming ChatML" in capsys.readouterr().err
    assert [c.value for c in parse_modelfile(text) if c.key == "stop"] == list(DEFAULT_STOP)


def test_check_modelfile_cli(tmp_path, capsys):
    from loraforge.cli import main

    write_gguf(tmp_path / "Q5_K_M.gguf")
    good = tmp_path / "Modelfile"
    good.write_text(render_modelfile("Q5_K_M.gguf", SYSTEM, 0.4, 0.8, 32768))
    assert main(["check-modelfile", str(good)]) == 0
    assert "ok (" in capsys.readouterr().out
    bad = tmp_path / "Modelfile.bad"
    bad.write_text("FROM ./Q4_K_M.gguf\nPARAMETER temperature hot\nPARAMETER top_k 40\nPARAMETER foo 1\n")
    assert main(["check-modelfile", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "line 1: FROM ./Q4_K_M.gguf: no such file" in out
    assert "line 2: invalid float value [hot]" in out and "line 4: unknown parameter 'foo'" in out
    assert main(["check-modelfile", str(bad), "--no-files"]) == 1
    assert "no such file" not in capsys.readouterr().out
    bad.write_text('FROM x\nSYSTEM """oops\n')
    assert main(["check-modelfile", str(bad)]) == 1
    assert "unexpected EOF" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# the TEMPLATE, executed by Go's text/template as Ollama executes it (when Go is installed)
# --------------------------------------------------------------------------------------

GO_PROGRAM = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var cases []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &cases); err != nil {
		panic(err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(string(src))
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(2)
	}
	var outs []string
	for _, c := range cases {
		vals := map[string]any{}
		for k, v := range c {
			if k == "Messages" {
				var msgs []Message
				json.Unmarshal(v, &msgs)
				vals[k] = msgs
			} else {
				var s string
				json.Unmarshal(v, &s)
				vals[k] = s
			}
		}
		var b strings.Builder
		if err := tmpl.Execute(&b, vals); err != nil {
			fmt.Fprintln(os.Stderr, "execute:", err)
			os.Exit(3)
		}
		outs = append(outs, b.String())
	}
	out, _ := json.Marshal(outs)
	fmt.Println(string(out))
}
'''


def render_with_go(tmp_path, template: str, cases: list[dict]) -> list[str]:
    """Each case rendered by Go's text/template (Ollama's engine) with `template`."""
    (tmp_path / "main.go").write_text(GO_PROGRAM)
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"), GO111MODULE="off",
               GOFLAGS="", GOTOOLCHAIN="local")
    proc = subprocess.run(["go", "run", "main.go", "t.tmpl", "cases.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow  # the tiny bases
@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_chatml_template_renders_like_the_hf_chat_template(tmp_path, tiny_bases):
    """Ollama's chat API passes .System (the joined system messages) and .Messages (system
    messages included); its generate API and old clients run the legacy form turn by turn with
    .System/.Prompt/.Response. Both must give exactly what the HF chat template gives."""
    from jinja2 import Template

    from loraforge.modelfile import chat_template_of

    msgs = [("system", "You are a Rails expert."), ("user", "Refactor:\nclass A; end"),
            ("assistant", "Use a concern."), ("user", "Why?")]
    M = [{"Role": r, "Content": c} for r, c in msgs]
    cases = [
        {"System": msgs[0][1], "Messages": M, "Response": ""},  # chat API
        {"System": "", "Messages": M[1:], "Response": ""},  # chat API, no system message
        {"System": msgs[0][1], "Prompt": msgs[1][1], "Response": msgs[2][1]},  # legacy: 1st turn
        {"System": "", "Prompt": msgs[3][1], "Response": ""},  # legacy: last turn
    ]
    chat, chat_nosys, legacy1, legacy2 = render_with_go(tmp_path, CHATML_GO_TEMPLATE, cases)
    hf = Template(chat_template_of(tiny_bases["qwen3"]))

    def render(ms):
        return hf.render(messages=[{"role": r, "content": c} for r, c in ms], add_generation_prompt=True)

    assert chat == render(msgs)
    assert chat_nosys == render(msgs[1:])
    assert legacy1 + legacy2 == render(msgs)
