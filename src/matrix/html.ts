/**
 * HTML for `formatted_body`: any HTML, from a connector or from a Matrix client, reduced to the
 * subset the Client-Server API suggests for `m.room.message` with `format: org.matrix.custom.html`
 * (Client-Server API §m.room.message msgtypes: the tags, the attributes per tag, `mxc://` images,
 * "Tags must not be nested more than 100 levels deep", and, since v1.13, no `mx-reply`).
 * https://spec.matrix.org/latest/client-server-api/#mroommessage-msgtypes
 *
 * The parsing and the allowlist mechanics are sanitize-html's (htmlparser2 underneath); this module
 * only says what the spec allows and the few value checks it cannot express.
 */
import sanitize from "sanitize-html";

/** [spec: m.room.message msgtypes] "Tags must not be nested more than 100 levels deep." */
export const MAX_NESTING = 100;

/**
 * HTML nested deeper than this, as the parser itself counts, is not sanitized at all (the message
 * goes as its text): htmlparser2 keeps its open elements in an array it `unshift`s, so each tag
 * costs as much as the depth; 200,000 nested tags (1 MB) took 13 s. Bounding the depth keeps
 * sanitizing linear in the input.
 */
export const MAX_PARSE_DEPTH = 1_000;

/**
 * Larger HTML is not sanitized (the message goes as its text): sanitizing blocks the event loop,
 * ~0.3 s per MiB on small hardware, and anything this large cannot fit an event anyway unless
 * most of it is thrown away.
 */
export const MAX_HTML_INPUT_CHARS = 1024 * 1024;

// [spec: m.room.message msgtypes] The strongly suggested tags (v1.10: `s` replaces `strike`;
// `font` is deprecated for new messages but still suggested for old ones, so kept).
// prettier-ignore
const ALLOWED_TAGS = [
  "font", "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup",
  "sub", "li", "b", "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table", "thead",
  "tbody", "tr", "th", "td", "caption", "pre", "span", "img", "details", "summary",
];

// [spec: m.room.message msgtypes] The permitted attributes, per tag; none on the others.
const ALLOWED_ATTRIBUTES: Record<string, string[]> = {
  font: ["data-mx-bg-color", "data-mx-color", "color"],
  span: ["data-mx-bg-color", "data-mx-color", "data-mx-spoiler", "data-mx-maths"],
  a: ["href", "target"],
  img: ["width", "height", "alt", "title", "src"],
  ol: ["start"],
  div: ["data-mx-maths"],
  // code: `class`, through allowedClasses below.
};

/** [spec] `a href`: "not relative and has a scheme matching one of …". */
const LINK_SCHEMES = ["https", "http", "ftp", "mailto", "magnet"];
const ABSOLUTE_LINK = /^(?:https?|ftp|mailto|magnet):/i;
/** [spec] `img src`: a Matrix Content URI, `mxc://<server-name>/<media-id>`. */
const MXC_URI = /^mxc:\/\/[A-Za-z0-9.:[\]-]+\/[A-Za-z0-9_-]+$/;

/** Attribute values the spec gives a form to; any other value drops the attribute. */
const VALUE_FORMS: Record<string, RegExp> = {
  // "a `#` character followed by a 6-character hex color code"
  "data-mx-color": /^#[0-9A-Fa-f]{6}$/,
  "data-mx-bg-color": /^#[0-9A-Fa-f]{6}$/,
  color: /^(?:#[0-9A-Fa-f]{6}|[A-Za-z]{1,20})$/,
  width: /^\d{1,5}$/,
  height: /^\d{1,5}$/,
  start: /^-?\d{1,9}$/,
  // The spec permits `target` without saying which; only a new tab is harmless in a web client
  // (`_top` or `_self` would navigate the client itself away, e.g. to a look-alike login page).
  target: /^_blank$/,
};

/**
 * What an element that must not stay becomes, its content kept: a bare `span`. (Renaming it to a
 * disallowed tag instead would leave sanitize-html 2.18 renaming the next sibling's end tag too.)
 */
const PLAIN = "span";

/**
 * A link to a Matrix user: matrix.to (`https://matrix.to/#/@alice:example.org`) or a client's own
 * permalink (`…/#/user/@alice:example.org`). Clients show these as pills, with the user's current
 * name and avatar, so they read as mentions.
 */
function isUserLink(href: string): boolean {
  let decoded = href;
  try {
    decoded = decodeURIComponent(href);
  } catch {
    // malformed escapes: test the text as it is
  }
  return /[#/]@[^\s/?#:]+:[^\s/?#]+/.test(decoded);
}

export interface HtmlPolicy {
  /**
   * Remote content: links to Matrix users become their plain text, so a far side cannot draw a
   * pill that looks like a mention of someone in the room.
   */
  readonly unlinkUsers: boolean;
}

class TooDeep extends Error {}

function optionsFor(policy: HtmlPolicy, depth: { now: number }): sanitize.IOptions {
  const link = (href: string | undefined): string | undefined => {
    const url = href?.trim();
    if (!url || !ABSOLUTE_LINK.test(url)) return undefined;
    if (policy.unlinkUsers && isUserLink(url)) return undefined;
    return url;
  };
  return {
    allowedTags: ALLOWED_TAGS,
    allowedAttributes: ALLOWED_ATTRIBUTES,
    allowedClasses: { code: ["language-*"] },
    allowedSchemes: LINK_SCHEMES,
    allowedSchemesByTag: { img: ["mxc"] },
    allowedSchemesAppliedToAttributes: ["href", "src"],
    allowProtocolRelative: false,
    nestingLimit: MAX_NESTING,
    disallowedTagsMode: "discard",
    // Dropped with their content (other disallowed tags keep their text). `mx-reply`: Client-Server
    // API §Rich replies, v1.13: "Clients SHOULD strip this tag and its content".
    // prettier-ignore
    nonTextTags: [
      "script", "style", "textarea", "option", "xmp", "noscript", "iframe", "noembed", "noframes",
      "title", "head", "template", "object", "mx-reply",
    ],
    parser: { decodeEntities: true, lowerCaseTags: true, lowerCaseAttributeNames: true },
    onOpenTag: () => {
      if (++depth.now > MAX_PARSE_DEPTH) throw new TooDeep();
    },
    onCloseTag: () => {
      depth.now--;
    },
    transformTags: {
      strike: "s", // deprecated HTML for what the spec now names `s`
      a: (tagName, attribs): sanitize.Tag => {
        const href = link(attribs.href);
        if (!href) return { tagName: PLAIN, attribs: {} };
        return { tagName, attribs: { ...attribs, href } };
      },
      img: (tagName, attribs): sanitize.Tag => {
        const src = attribs.src?.trim() ?? "";
        if (MXC_URI.test(src)) return { tagName, attribs: { ...attribs, src } };
        // Not on the media repository: shown inline, it would be fetched by every reader's client
        // from wherever the far side says (their address, when they read it: a tracking pixel).
        // One with a name becomes a link a reader may follow; one without (tracking pixels,
        // spacers) is dropped; any other scheme (data:, cid:) leaves its name as text.
        const label = (attribs.alt || attribs.title || "").trim();
        const href = /^https?:/i.test(src) ? link(src) : undefined;
        if (label && href) return { tagName: "a", attribs: { href }, text: label };
        return { tagName: PLAIN, attribs: {}, text: label };
      },
      "*": (tagName, attribs) => {
        const kept: sanitize.Attributes = {};
        for (const [name, value] of Object.entries(attribs)) {
          const form = VALUE_FORMS[name];
          if (!form || form.test(value)) kept[name] = value;
        }
        return { tagName, attribs: kept };
      },
    },
  };
}

const REMOTE_OPTIONS = { unlinkUsers: true };

/**
 * `html` within the spec's allowlist, or undefined when nothing is left worth showing (no text, no
 * image), or when it is too large or too deeply nested to sanitize in bounded time (then the
 * message's plain text stands alone). Tags nested deeper than MAX_NESTING are dropped, their text
 * kept.
 */
export function sanitizeMatrixHtml(html: string, policy: HtmlPolicy = REMOTE_OPTIONS): string | undefined {
  if (html.length > MAX_HTML_INPUT_CHARS) return undefined;
  let clean: string;
  try {
    clean = sanitize(html, optionsFor(policy, { now: 0 }));
  } catch (err) {
    if (err instanceof TooDeep) return undefined;
    throw err;
  }
  clean = clean.replace(/<span><\/span>/g, ""); // images dropped without a name
  return showsSomething(clean) ? clean : undefined;
}

/**
 * Whether sanitized HTML shows any text or an image. In sanitize-html's output every `<` and `>`
 * outside a tag is escaped, so removing tags leaves the text (with entities, all of them visible).
 */
function showsSomething(clean: string): boolean {
  return /<img\s/.test(clean) || /\S/.test(clean.replace(/<[^>]*>/g, ""));
}
