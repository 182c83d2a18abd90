import { test } from "node:test";
import assert from "node:assert/strict";
import {
  escapeHtml,
  fileContent,
  fromMatrixContent,
  replacementContent,
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

test("[spec: m.room.message msgtypes] toMatrixContent posts the connector's HTML, sanitized", () => {
  const c = toMatrixContent({ text: "bold", html: "<b>bold</b><script>alert(1)</script>" });
  assert.deepEqual(c, {
    msgtype: "m.text",
    body: "bold",
    format: "org.matrix.custom.html",
    formatted_body: "<b>bold</b>",
    "m.mentions": {},
  });
  assert.equal(toMatrixContent({ text: "t", html: "<i>t</i>", notice: true }).msgtype, "m.notice");
});

test("toMatrixContent: hostile HTML arrives sanitized", () => {
  const html =
    '<p onclick="x">hi <img src="https://evil.example/pixel.gif"><iframe src="https://evil.example"></iframe>' +
    '<span data-mx-evil="1" data-mx-color="#ff0000">red</span> <a href="javascript:alert(1)">js</a></p>' +
    "<div>".repeat(500) +
    "deep" +
    "</div>".repeat(500);
  const c = toMatrixContent({ text: "hi red js deep", html });
  const out = String(c.formatted_body);
  assert.equal(c.body, "hi red js deep");
  assert.ok(out.startsWith('<p>hi <span data-mx-color="#ff0000">red</span> <span>js</span></p>'), out);
  assert.doesNotMatch(out, /script|iframe|evil|onclick|javascript|data-mx-evil/);
  assert.equal(out.match(/<div>/g)?.length, 100, "nesting within the spec's 100");
});

test("toMatrixContent: HTML that shows nothing, too deep or too large: the text alone", () => {
  for (const html of ["", "<script>x</script>", "<p> </p>", "<b>".repeat(5000) + "x"]) {
    const c = toMatrixContent({ text: "plain", html });
    assert.equal(c.format, undefined);
    assert.equal(c.formatted_body, undefined);
    assert.equal(c.body, "plain");
  }
});

test("toMatrixContent: text and HTML over the byte budget: the text alone", () => {
  const html = `<b>${"x".repeat(100)}</b>`;
  assert.equal(toMatrixContent({ text: "x".repeat(100), html }, 300).formatted_body, html);
  assert.equal(toMatrixContent({ text: "x".repeat(100), html }, 200).formatted_body, undefined);
  // JSON escapes count: quotes in attributes take two bytes each.
  const link = '<a href="https://e.example">e</a>';
  assert.equal(toMatrixContent({ text: "e", html: link }, 1 + link.length).formatted_body, undefined);
  assert.equal(toMatrixContent({ text: "e", html: link }, 1 + link.length + 6).formatted_body, link);
});

test("toMatrixContent: an empty text with HTML gets its text from the HTML", () => {
  const c = toMatrixContent({
    text: "",
    html: "<h1>Alert</h1><p>pump <b>2</b> &amp; 3 &lt; 4</p><ul><li>a</li><li>b</li></ul>",
  });
  assert.equal(c.body, "Alert\npump 2 & 3 < 4\na\nb");
  assert.equal(c.format, "org.matrix.custom.html");
});

test("[spec: user and room mentions] remote HTML mentions nobody: user links become text, m.mentions {}", () => {
  const c = toMatrixContent({
    text: "@room Alice",
    html: '@room <a href="https://matrix.to/#/@alice:example.org">Alice</a>',
  });
  assert.deepEqual(c["m.mentions"], {});
  assert.equal(c.formatted_body, "@room <span>Alice</span>");
});

test("fileContent: images are m.image, audio m.audio, video m.video, other files m.file, with mentions {}", () => {
  assert.deepEqual(fileContent("a.png", "image/png", 10, { url: "mxc://hs/abc" }), {
    msgtype: "m.image",
    body: "a.png",
    filename: "a.png",
    url: "mxc://hs/abc",
    info: { mimetype: "image/png", size: 10 },
    "m.mentions": {},
  });
  assert.equal(fileContent("a.bin", "application/octet-stream", 1, { url: "mxc://hs/x" }).msgtype, "m.file");
  assert.equal(fileContent("a.ogg", "audio/ogg", 1, { url: "mxc://hs/x" }).msgtype, "m.audio");
  assert.equal(fileContent("a.mp4", "video/mp4", 1, { url: "mxc://hs/x" }).msgtype, "m.video");
});

test("[spec: sending encrypted attachments] fileContent: an encrypted file's `file` in place of `url`", () => {
  const file = {
    url: "mxc://hs/enc",
    v: "v2" as const,
    key: {
      kty: "oct" as const,
      key_ops: ["encrypt", "decrypt"],
      alg: "A256CTR" as const,
      k: "aWF6-32KGYaC3A_FEUCk1Bt0JA37zP0wrStgmdCaW-0",
      ext: true as const,
    },
    iv: "w+sE15fzSc0AAAAAAAAAAA",
    hashes: { sha256: "fdSLu/YkRx3Wyh3KQabP3rd6+SFiKg5lsJZQHtkSAYA" },
  };
  const c = fileContent("a.png", "image/png", 10, { file });
  assert.deepEqual(c.file, file);
  assert.equal("url" in c, false);
  assert.equal(c.msgtype, "m.image");
});

test("[spec: event replacements] an edit carries the formatted body in m.new_content, with a * fallback", () => {
  const content = toMatrixContent({ text: "21 °C", html: "<b>21</b> °C", notice: true });
  assert.deepEqual(replacementContent("$orig", content), {
    msgtype: "m.notice",
    body: "* 21 °C",
    format: "org.matrix.custom.html",
    formatted_body: "* <b>21</b> °C",
    "m.mentions": {},
    "m.new_content": content,
    "m.relates_to": { rel_type: "m.replace", event_id: "$orig" },
  });
  const plain = replacementContent("$orig", toMatrixContent({ text: "22 °C" }));
  assert.equal(plain.formatted_body, undefined);
  assert.equal(plain.format, undefined);
  assert.equal((plain["m.new_content"] as Record<string, unknown>).formatted_body, undefined);
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
  assert.deepEqual(fromMatrixContent({ msgtype: "m.file", body: "f.bin" }, "A"), { text: "f.bin" });
});

test("fromMatrixContent: a url or geo_uri of the wrong type is left out, never '[object Object]'", () => {
  for (const url of [{ mxc: "x" }, 5, null, ["mxc://a/b"], ""])
    assert.deepEqual(fromMatrixContent({ msgtype: "m.image", body: "cat.jpg", url }, "A"), {
      text: "cat.jpg",
    });
  assert.deepEqual(fromMatrixContent({ msgtype: "m.location", body: "here", geo_uri: { lat: 1 } }, "A"), {
    text: "here",
  });
  for (const body of [{ text: "hi" }, 42, null, ["hi"]])
    assert.equal(fromMatrixContent({ msgtype: "m.text", body }, "A"), undefined);
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

test("fromMatrixContent: HTML reaches a far side that shows it, sanitized; never one that does not", () => {
  const content = {
    msgtype: "m.text",
    body: "**hi** there",
    format: "org.matrix.custom.html",
    formatted_body: '<b>hi</b> there<img src="x" onerror="alert(1)"><script>x</script>',
  };
  assert.deepEqual(fromMatrixContent(content, "A", { html: true }), {
    text: "**hi** there",
    html: "<b>hi</b> there",
  });
  assert.deepEqual(fromMatrixContent(content, "A", { html: false }), { text: "**hi** there" });
  assert.deepEqual(fromMatrixContent(content, "A"), { text: "**hi** there" });
  assert.deepEqual(fromMatrixContent({ ...content, msgtype: "m.notice" }, "A", { html: true }), {
    text: "**hi** there",
    html: "<b>hi</b> there",
    notice: true,
  });
});

test("fromMatrixContent: no HTML without format org.matrix.custom.html, or when nothing shows", () => {
  const base = { msgtype: "m.text", body: "hi" };
  for (const extra of [
    { formatted_body: "<b>hi</b>" },
    { format: "org.example.other", formatted_body: "<b>hi</b>" },
    { format: "org.matrix.custom.html", formatted_body: 42 },
    { format: "org.matrix.custom.html", formatted_body: "<p> </p>" },
  ]) {
    assert.deepEqual(fromMatrixContent({ ...base, ...extra }, "A", { html: true }), { text: "hi" });
  }
});

test("fromMatrixContent: an emote's HTML is prefixed like its text, the name escaped", () => {
  const emote = {
    msgtype: "m.emote",
    body: "waves",
    format: "org.matrix.custom.html",
    formatted_body: "<i>waves</i>",
  };
  assert.deepEqual(fromMatrixContent(emote, "<Al & Ice>", { html: true }), {
    text: "* <Al & Ice> waves",
    html: "* &lt;Al &amp; Ice&gt; <i>waves</i>",
  });
});

test("[spec: rich replies] fromMatrixContent strips the HTML reply fallback (mx-reply) too", () => {
  const reply = {
    msgtype: "m.text",
    body: "> <@bob:example.org> turn it on\n\nok, **done**",
    format: "org.matrix.custom.html",
    formatted_body:
      '<mx-reply><blockquote><a href="https://matrix.to/#/!r:x/$q">In reply to</a> ' +
      '<a href="https://matrix.to/#/@bob:example.org">@bob:example.org</a><br>turn it on</blockquote></mx-reply>ok, <b>done</b>',
    "m.relates_to": { "m.in_reply_to": { event_id: "$q" } },
  };
  assert.deepEqual(fromMatrixContent(reply, "A", { html: true }), {
    text: "ok, **done**",
    html: "ok, <b>done</b>",
  });
});

test("fromMatrixContent: a media caption goes as text only", () => {
  const image = {
    msgtype: "m.image",
    body: "a <b>cat</b>",
    filename: "cat.jpg",
    url: "mxc://x/y",
    format: "org.matrix.custom.html",
    formatted_body: "a <b>cat</b>",
  };
  assert.deepEqual(fromMatrixContent(image, "A", { html: true }), { text: "a <b>cat</b> (mxc://x/y)" });
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
