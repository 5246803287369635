"""Generated tokens -> final text pieces."""

from conftest import tiny_tokenizer

from koff.serve.text import TextStream


class Bytes:
    """A tokenizer whose tokens are single UTF-8 bytes (so a character can span tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_wait_for_whole_characters_and_add_up():
    s = TextStream(Bytes())
    data = "héllo wörld".encode()
    pieces = [s.push(b) for b in data]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + s.finish() == "héllo wörld"
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes: nothing until its second one


def test_stop_sequence_is_cut_and_its_start_held_back():
    s = TextStream(Bytes(), stop=("END", "xyz"))
    out = [s.push(b) for b in b"abc EN"]
    assert "".join(out) == "abc "  # "EN" could still become "END"
    assert s.push(ord("D")) == "" and s.stopped
    assert s.text == "abc " and s.finish() == ""
    t = TextStream(Bytes(), stop=("END",))
    assert "".join(t.push(b) for b in b"ENTER") + t.finish() == "ENTER"  # a false start is released


def test_real_tokenizer_pieces_equal_one_decode():
    tok = tiny_tokenizer()
    ids = tok("the cat sat on a mat and the dog ran", add_special_tokens=False)["input_ids"]
    s = TextStream(tok)
    assert "".join(s.push(i) for i in ids) + s.finish() == tok.decode(ids, skip_special_tokens=True)
