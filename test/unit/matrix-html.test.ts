/**
 * The HTML sanitizer against the spec's allowlist (Client-Server API §m.room.message msgtypes) and
 * against hostile input.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MAX_NESTING, MAX_PARSE_DEPTH, sanitizeMatrixHtml } from "../../src/matrix/html.js";

const clean = (html: string) => sanitizeMatrixHtml(html);

/** Deepest element nesting of sanitized HTML (well formed; void elements written `<x />`). */
function depthOf(html: string): number {
  let depth = 0;
  let max = 0;
  for (const [, close, name, self] of html.matchAll(/<(\/?)([a-z0-9-]+)[^>]*?(\/?)>/g)) {
    if (self || name === "br" || name === "hr" || name === "img") continue;
    depth += close ? -1 : 1;
    max = Math.max(max, depth);
  }
  assert.equal(depth, 0, "every element is closed");
  return max;
}

// --- the allowed subset ---------------------------------------------------------------------------

test("[spec: m.room.message msgtypes] the suggested tags pass through intact", () => {
  const html =
    "<h1>t</h1><h2>t</h2><h3>t</h3><h4>t</h4><h5>t</h5><h6>t</h6>" +
    "<p><b>b</b><i>i</i><u>u</u><strong>s</strong><em>e</em><s>s</s><del>d</del><sup>1</sup><sub>2</sub></p>" +
    "<blockquote>q</blockquote><ul><li>a</li></ul><ol><li>b</li></ol><hr /><br />" +
    "<div>d</div><pre><code>x = 1</code></pre><span>s</span><font>f</font>" +
    "<table><caption>c</caption><thead><tr><th>h</th></tr></thead><tbody><tr><td>d</td></tr></tbody></table>" +
    "<details><summary>more</summary>hidden</details>";
  assert.equal(clean(html), html);
});

test("[spec: m.room.message msgtypes] the permitted attributes pass through intact", () => {
  const html =
    '<font data-mx-bg-color="#000000" data-mx-color="#FFFFFF" color="#ff0000">f</font>' +
    '<span data-mx-bg-color="#112233" data-mx-color="#445566">c</span>' +
    "<span data-mx-spoiler>spoiler</span>" +
    '<span data-mx-spoiler="the ending">reason</span>' +
    '<span data-mx-maths="\\sin(x)">sin x</span><div data-mx-maths="x^2">x²</div>' +
    '<a href="https://example.org/a?b=c#d" target="_blank">https</a><a href="http://example.org">http</a>' +
    '<a href="ftp://example.org/f">ftp</a><a href="mailto:a@example.org">mail</a>' +
    '<a href="magnet:?xt=urn:btih:abc">magnet</a>' +
    '<img width="64" height="32" alt="cat" title="a cat" src="mxc://example.org/AbC_1-2" />' +
    '<ol start="3"><li>three</li></ol><code class="language-typescript">let x</code>';
  assert.equal(clean(html), html);
});

test("deprecated <strike> becomes <s>, which the spec now names", () => {
  assert.equal(clean("<strike>old</strike>"), "<s>old</s>");
});

test("text is escaped, entities kept as what they mean", () => {
  assert.equal(clean("<b>1 &lt; 2 &amp;&amp; a &gt; b</b>"), "<b>1 &lt; 2 &amp;&amp; a &gt; b</b>");
  assert.equal(clean("<b>x</b> 3 < 4"), "<b>x</b> 3 &lt; 4");
});

// --- hostile input --------------------------------------------------------------------------------

test("script, style, iframe, object and the like go with their content", () => {
  assert.equal(clean("<b>hi</b><script>alert(1)</script>"), "<b>hi</b>");
  assert.equal(clean("<SCRIPT>alert(1)</SCRIPT>ok"), "ok");
  assert.equal(clean("<style>body { display: none }</style>ok"), "ok");
  assert.equal(clean('<iframe src="https://evil.example"><b>fallback</b></iframe>ok'), "ok");
  assert.equal(clean("<noscript><b>x</b></noscript>ok"), "ok");
  assert.equal(clean("<svg><script>alert(1)</script><text>t</text></svg>"), "t");
  assert.equal(clean('<object data="x.swf">fallback</object><embed src="x.swf">ok'), "ok");
  assert.equal(clean("<textarea><b>x</b></textarea><xmp><img src=x onerror=alert(1)></xmp>ok"), "ok");
  assert.equal(clean("<scr<script>x</script>ipt>alert(1)</script>"), "xipt&gt;alert(1)", "text, escaped");
  assert.equal(clean("<html><head><title>T</title></head><body><p>mail</p></body></html>"), "<p>mail</p>");
});

test("other tags go, their text stays", () => {
  assert.equal(clean('<form action="https://x"><input value="v"><button>go</button></form>'), "go");
  assert.equal(clean("<marquee><blink>old</blink></marquee>"), "old");
  assert.equal(clean("<!-- hidden --><b>shown</b><!DOCTYPE html><?xml?>"), "<b>shown</b>");
});

test("on* and style attributes, and any attribute the spec does not list, are dropped", () => {
  assert.equal(clean('<b onclick="alert(1)" style="color:red" id="x" class="c">b</b>'), "<b>b</b>");
  assert.equal(
    clean('<img src="mxc://hs.example/m" onerror="alert(1)" onload="x" />'),
    '<img src="mxc://hs.example/m" />',
  );
  assert.equal(clean('<p title="t" dir="rtl" data-x="1">p</p>'), "<p>p</p>");
  assert.equal(
    clean('<a href="https://ok.example" rel="opener" ping="https://t">a</a>'),
    '<a href="https://ok.example">a</a>',
  );
});

test("data-mx-* outside the allowlist, or with a value out of form, is dropped", () => {
  assert.equal(clean('<span data-mx-evil="1" data-mx-profile="@a:b">s</span>'), "<span>s</span>");
  assert.equal(clean('<p data-mx-color="#ff0000">p</p>'), "<p>p</p>");
  assert.equal(clean('<div data-mx-spoiler data-mx-color="#ff0000">d</div>'), "<div>d</div>");
  assert.equal(
    clean('<a href="https://x.example" data-mx-maths="x">a</a>'),
    '<a href="https://x.example">a</a>',
  );
  assert.equal(
    clean('<span data-mx-color="red" data-mx-bg-color="#12345">s</span>'),
    "<span>s</span>",
    "a # and six hex digits",
  );
  assert.equal(clean('<span data-mx-color="#123456;background:url(x)">s</span>'), "<span>s</span>");
  assert.equal(clean('<font color="red;x:y" face="Comic">f</font>'), "<font>f</font>");
});

test("a href: javascript:, data:, vbscript:, relative and protocol-relative links lose their link", () => {
  for (const href of [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "&#106;avascript:alert(1)",
    "java&#x09;script:alert(1)",
    "java\nscript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD4=",
    "vbscript:msgbox(1)",
    "/relative/path",
    "relative",
    "//evil.example/x",
    "matrix:u/alice:example.org",
    "",
  ]) {
    assert.equal(clean(`<a href="${href}">click</a>`), "<span>click</span>", href);
  }
  assert.equal(clean("<a>no href</a>"), "<span>no href</span>");
  assert.equal(clean('<a href="https://x.example" target="_top">t</a>'), '<a href="https://x.example">t</a>');
});

test("img: mxc:// only; a named remote image becomes a link, an unnamed one (a pixel) goes", () => {
  assert.equal(
    clean('<img src="mxc://example.org/abc" alt="a" />'),
    '<img src="mxc://example.org/abc" alt="a" />',
  );
  assert.equal(clean('<img src="https://tracker.example/p.gif" width="1" height="1">'), undefined);
  assert.equal(clean('x<img src="https://tracker.example/p.gif">'), "x");
  assert.equal(
    clean('<img src="https://example.org/chart.png" alt="Chart" width="600">'),
    '<a href="https://example.org/chart.png">Chart</a>',
  );
  assert.equal(
    clean('<img src="http://example.org/c.png" title="T">'),
    '<a href="http://example.org/c.png">T</a>',
  );
  assert.equal(clean('<img src="data:image/png;base64,AAAA" alt="inline">'), "<span>inline</span>");
  assert.equal(clean('<img src="cid:part1@mail" alt="logo">'), "<span>logo</span>");
  assert.equal(clean('<img src="javascript:alert(1)" alt="x">'), "<span>x</span>");
  assert.equal(clean('<img src="mxc://example.org/../etc" alt="y">'), "<span>y</span>");
  assert.equal(
    clean('<img src="mxc://example.org/abc" width="100%" height="9999999" />'),
    '<img src="mxc://example.org/abc" />',
  );
});

test("[spec: rich replies, v1.13] <mx-reply> goes with its content", () => {
  assert.equal(
    clean(
      '<mx-reply><blockquote><a href="https://matrix.to/#/$e">In reply to</a> <b>x</b></blockquote></mx-reply>answer',
    ),
    "answer",
  );
  assert.equal(clean("<p>a</p><mx-reply>quoted</mx-reply><p>b</p>"), "<p>a</p><p>b</p>");
});

test("remote content: links to Matrix users become plain text (no pill); other links stay", () => {
  assert.equal(clean('<a href="https://matrix.to/#/@alice:example.org">Alice</a>'), "<span>Alice</span>");
  assert.equal(clean('<a href="https://matrix.to/#/%40alice%3Aexample.org">A</a>'), "<span>A</span>");
  assert.equal(clean('<a href="https://app.element.io/#/user/@alice:example.org">A</a>'), "<span>A</span>");
  assert.equal(
    clean('<img src="https://matrix.to/#/@admin:example.org" alt="admin">'),
    "<span>admin</span>",
    "not through an image either",
  );
  const room = '<a href="https://matrix.to/#/#room:example.org">#room</a>';
  assert.equal(clean(room), room, "a room link mentions nobody");
  assert.equal(clean("@room look"), "@room look", "@room is text; m.mentions {} keeps it from pinging");
  // From a Matrix client (outbound), a user link is just a link.
  const pill = '<a href="https://matrix.to/#/@alice:example.org">Alice</a>';
  assert.equal(sanitizeMatrixHtml(pill, { unlinkUsers: false }), pill);
});

test("nothing that shows: undefined", () => {
  for (const html of ["", "   ", "<p> </p>", "<br><hr>", "<script>x</script>", "<b></b>", "<!-- c -->"]) {
    assert.equal(clean(html), undefined, JSON.stringify(html));
  }
});

// --- nesting and size -----------------------------------------------------------------------------

test(`[spec: m.room.message msgtypes] 500-deep nesting comes out at most ${MAX_NESTING} deep, text kept`, () => {
  for (const tag of ["div", "b", "blockquote", "span"]) {
    const out = clean(`<${tag}>`.repeat(500) + "deep" + `</${tag}>`.repeat(500))!;
    assert.ok(out.includes("deep"));
    assert.equal(depthOf(out), MAX_NESTING, tag);
  }
  // Unclosed, and mixed with tags that are dropped (which count towards the parser's depth).
  const out = clean("<div><x-y>".repeat(250) + "deep")!;
  assert.ok(out.includes("deep"));
  assert.ok(depthOf(out) <= MAX_NESTING);
});

test(`nesting over ${MAX_PARSE_DEPTH} is not sanitized (text only), and fast`, () => {
  assert.ok(clean("<b>".repeat(MAX_PARSE_DEPTH - 1) + "x"));
  assert.equal(clean("<b>".repeat(MAX_PARSE_DEPTH + 1) + "x"), undefined);
});

test("1 MB inputs take bounded, linear time", () => {
  const cases: [string, string][] = [
    ["1 MB of nesting", "<div>".repeat(200_000) + "x"], // 13 s without the depth bound
    ["1 MB of unknown nested tags", "<x>".repeat(330_000)],
    [
      "1 MB nested just under the bound, repeatedly",
      ("<i>".repeat(999) + "x" + "</i>".repeat(999)).repeat(140),
    ],
    ["1 MB of ordinary HTML", '<p>hello <b>world</b> <a href="https://x.example">l</a></p>'.repeat(17_000)],
    [
      "1 MB of hostile HTML",
      '<script>x</script><img src=x onerror="y"><a href="javascript:z">a</a>'.repeat(14_000),
    ],
  ];
  for (const [what, html] of cases) {
    assert.ok(html.length > 900_000 && html.length < 1_048_576, `${what}: ${html.length}`);
    const started = performance.now();
    sanitizeMatrixHtml(html);
    const ms = performance.now() - started;
    // ~0.5 s on a small 2-core machine for the slowest; a quadratic case would take tens of seconds.
    assert.ok(ms < 5_000, `${what}: ${Math.round(ms)} ms`);
  }
  assert.equal(clean("<b>x</b>".repeat(150_000)), undefined, "over 1 MiB: text only");
});
