import { test } from "node:test";
import assert from "node:assert/strict";
import {
  escapeHtml,
  fileContent,
  fromMatrixContent,
  stripReplyFallback,
  toMatrixContent,
} from "../../src/matrix/format.js";
import { displayNameOf } from "../../src/matrix/room-delivery.js";

// --- toMatrixContent ------------------------------------------------------------------------------

test("toMatrixContent: a notice is m.notice", () => {
  assert.deepEqual(toMatrixContent({ text: "21 °C", notice: true }), {
    msgtype: "m.notice",
    body: "21 °C",
    "m.mentions": {},
  });
});

test("toMatrixContent: otherwise m.text", () => {
  assert.equal(toMatrixContent({ text: "hi" }).msgtype, "m.text");
  assert.equal(toMatrixContent({ text: "hi", notice: false }).msgtype, "m.text");
});

test("[spec: user and room mentions] m.mentions is always {} so remote text pings nobody", () => {
  for (const text of ["@room wake up", "hi @alice:example.org", ""]) {
    const c = toMatrixContent({ text });
    assert.deepEqual(c["m.mentions"], {});
    assert.equal(c.body, text);
  }
});

test("toMatrixContent never passes remote HTML through", () => {
  const c = toMatrixContent({ text: "plain", html: "<b>bold</b><script>x</script>" });
  assert.equal(c.format, undefined);
  assert.equal(c.formatted_body, undefined);
  assert.equal(c.body, "plain");
});

test("fileContent: images are m.image, other files m.file, with mentions {}", () => {
  assert.deepEqual(fileContent("a.png", "image/png", 10, "mxc://hs/abc"), {
    msgtype: "m.image",
    body: "a.png",
    filename: "a.png",
    url: "mxc://hs/abc",
    info: { mimetype: "image/png", size: 10 },
    "m.mentions": {},
  });
  assert.equal(fileContent("a.bin", "application/octet-stream", 1, "mxc://hs/x").msgtype, "m.file");
});

test("escapeHtml", () => {
  assert.equal(escapeHtml(`<a href="x">'&'</a>`), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
});

// --- fromMatrixContent ----------------------------------------------------------------------------

test("fromMatrixContent: m.text", () => {
  assert.deepEqual(fromMatrixContent({ msgtype: "m.text", body: "hello" }, "Alice"), { text: "hello" });
});

test("fromMatrixContent: m.notice keeps notice", () => {
  assert.deepEqual(fromMatrixContent({ msgtype: "m.notice", body: "status" }, "Bot"), {
    text: "status",
    notice: true,
  });
});

test("fromMatrixContent: m.emote becomes '* <name> <body>'", () => {
  assert.deepEqual(fromMatrixContent({ msgtype: "m.emote", body: "waves" }, "Alice"), {
    text: "* Alice waves",
  });
});

test("fromMatrixContent: media becomes text with the url", () => {
  for (const msgtype of ["m.image", "m.file", "m.audio", "m.video"]) {
    assert.deepEqual(fromMatrixContent({ msgtype, body: "cat.jpg", url: "mxc://example.org/abc" }, "A"), {
      text: "cat.jpg (mxc://example.org/abc)",
    });
  }
});

test("fromMatrixContent: media without a url (e.g. encrypted file) still gives text", () => {
  assert.deepEqual(fromMatrixContent({ msgtype: "m.file", body: "f.bin" }, "A"), { text: "f.bin ()" });
});

test("[spec: event replacements] edits (rel_type m.replace) are not relayed", () => {
  const edit = {
    msgtype: "m.text",
    body: " * fixed",
    "m.new_content": { msgtype: "m.text", body: "fixed" },
    "m.relates_to": { rel_type: "m.replace", event_id: "$orig" },
  };
  assert.equal(fromMatrixContent(edit, "A"), undefined);
});

test("fromMatrixContent: other relations (threads) are relayed", () => {
  const threaded = {
    msgtype: "m.text",
    body: "in thread",
    "m.relates_to": { rel_type: "m.thread", event_id: "$root" },
  };
  assert.deepEqual(fromMatrixContent(threaded, "A"), { text: "in thread" });
});

test("fromMatrixContent: nothing said is not relayed; a file without a caption still is", () => {
  assert.equal(fromMatrixContent({ msgtype: "m.text", body: "  \n" }, "A"), undefined);
  assert.equal(fromMatrixContent({ msgtype: "m.emote", body: "" }, "A"), undefined);
  assert.deepEqual(fromMatrixContent({ msgtype: "m.file", body: "", url: "mxc://x/y" }, "A"), {
    text: " (mxc://x/y)",
  });
});

test("fromMatrixContent: a shared location is its description and geo URI", () => {
  assert.deepEqual(fromMatrixContent({ msgtype: "m.location", body: "here", geo_uri: "geo:1,2" }, "A"), {
    text: "here (geo:1,2)",
  });
});

test("fromMatrixContent: unknown msgtype, missing msgtype or missing body gives undefined", () => {
  assert.equal(fromMatrixContent({ msgtype: "org.example.custom", body: "x" }, "A"), undefined);
  assert.equal(fromMatrixContent({ body: "no msgtype" }, "A"), undefined);
  assert.equal(fromMatrixContent({ msgtype: "m.text" }, "A"), undefined);
  assert.equal(fromMatrixContent({ msgtype: "m.text", body: 42 }, "A"), undefined);
  assert.equal(fromMatrixContent({}, "A"), undefined);
});

test("[spec: rich replies] fromMatrixContent strips the reply fallback of a reply", () => {
  const reply = {
    msgtype: "m.text",
    body: "> <@bob:example.org> turn it on\n> please\n\nok, done",
    "m.relates_to": { "m.in_reply_to": { event_id: "$q" } },
  };
  assert.deepEqual(fromMatrixContent(reply, "A"), { text: "ok, done" });
  assert.deepEqual(fromMatrixContent({ ...reply, msgtype: "m.notice" }, "A"), {
    text: "ok, done",
    notice: true,
  });
});

test("[spec: rich replies] a message that is not a reply keeps its leading quote", () => {
  const quote = { msgtype: "m.text", body: "> the manual says\n\nthat is wrong" };
  assert.deepEqual(fromMatrixContent(quote, "A"), { text: "> the manual says\n\nthat is wrong" });
  assert.deepEqual(fromMatrixContent({ msgtype: "m.text", body: "> only a quote" }, "A"), {
    text: "> only a quote",
  });
});

test("[spec: rich replies, Matrix 1.13] a reply without a fallback keeps its own leading quote", () => {
  const reply = (body: string, relates: Record<string, unknown>) =>
    fromMatrixContent({ msgtype: "m.text", body, "m.relates_to": relates }, "A");
  const inReplyTo = { "m.in_reply_to": { event_id: "$q" } };
  assert.deepEqual(reply("> 22", inReplyTo), { text: "> 22" });
  assert.deepEqual(reply("> manual says 20\n\nset 22", inReplyTo), { text: "> manual says 20\n\nset 22" });
  // A thread message's m.in_reply_to for older clients (is_falling_back) has no quote to strip.
  const thread = { rel_type: "m.thread", event_id: "$root", is_falling_back: true, ...inReplyTo };
  assert.deepEqual(reply("> <@bob:x> looks like a fallback\n\nbut is not", thread), {
    text: "> <@bob:x> looks like a fallback\n\nbut is not",
  });
});

// --- stripReplyFallback ---------------------------------------------------------------------------

test("[spec: rich replies] stripReplyFallback removes the '> ' lines and the blank line after them", () => {
  assert.equal(stripReplyFallback("> <@bob:example.org> hi\n\nhello back"), "hello back");
  assert.equal(stripReplyFallback("> <@bob:example.org> line 1\n> line 2\n\nanswer\nmore"), "answer\nmore");
});

test("stripReplyFallback keeps only one blank line's worth: a second blank line stays", () => {
  assert.equal(stripReplyFallback("> <@b:x> q\n\n\nanswer"), "\nanswer");
});

test("stripReplyFallback leaves bodies without a fallback alone", () => {
  assert.equal(stripReplyFallback("hello"), "hello");
  assert.equal(stripReplyFallback("> no sender quoted\n\ntext"), "> no sender quoted\n\ntext");
  assert.equal(stripReplyFallback("> <@b:x> one line only"), "> <@b:x> one line only");
  assert.equal(stripReplyFallback(">no space"), ">no space");
  assert.equal(stripReplyFallback("text\n> quoted later"), "text\n> quoted later");
  assert.equal(stripReplyFallback(""), "");
});

test("stripReplyFallback: a reply without a blank separator line", () => {
  assert.equal(stripReplyFallback("> <@b:x> q\nanswer"), "answer");
});

test("a device's name as a display name: no control or bidi-override characters, at most 256", () => {
  assert.equal(displayNameOf("Room Admin\u202e nimda"), "Room Admin nimda");
  assert.equal(displayNameOf("line\nbreak\u0000"), "linebreak");
  assert.equal(displayNameOf("\u202e"), "device");
  assert.equal(displayNameOf("x".repeat(300)).length, 256);
  assert.equal(displayNameOf("Küche 🌡️"), "Küche 🌡️");
});
