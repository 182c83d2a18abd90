/**
 * Authentication-Results header fields (RFC 8601), read only as far as the bridge needs them: who
 * wrote one (its authserv-id) and the results of its methods (dmarc=fail, …).
 *
 * No maintained npm package parses them (mailauth writes them and parses ARC's copies internally,
 * not as an API), so this follows the RFC's grammar (§2.2) itself:
 *
 *   authres-header = authserv-id [CFWS authres-version] (no-result / 1*resinfo)
 *   resinfo        = ";" methodspec [reasonspec] *propspec
 *   methodspec     = method [ "/" method-version ] "=" result
 *   reasonspec     = "reason" "=" value            (value: token or quoted-string)
 *   propspec       = ptype "." property "=" pvalue
 *
 * with comments `( … )` (nested, with quoted pairs) allowed between any two of them.
 */

export interface AuthResult {
  /** Lower case: "dmarc", "dkim", "spf", … */
  readonly method: string;
  /** Lower case: "pass", "fail", "none", … */
  readonly result: string;
  readonly reason?: string;
  /** `ptype.property` (lower case) → value, e.g. "header.from" → "example.org". */
  readonly properties: Readonly<Record<string, string>>;
}

export interface AuthenticationResults {
  /** Lower case: the authserv-id (usually the host name of the server that checked). */
  readonly authservId: string;
  readonly results: readonly AuthResult[];
}

/** A header field longer than this is not read (a forged or broken one; real ones are short). */
const MAX_FIELD_LENGTH = 16 * 1024;

/** Comments out, quoted strings kept (with their quotes); undefined when unbalanced. */
function withoutComments(value: string): string | undefined {
  let out = "";
  let depth = 0;
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i]!;
    if (c === "\\" && (quoted || depth > 0)) {
      if (depth === 0) out += c + (value[i + 1] ?? "");
      i++;
    } else if (quoted) {
      out += c;
      if (c === '"') quoted = false;
    } else if (c === "(") depth++;
    else if (c === ")") {
      if (depth === 0) return undefined;
      depth--;
      if (depth === 0) out += " ";
    } else if (depth === 0) {
      if (c === '"') quoted = true;
      out += c;
    }
  }
  return depth === 0 && !quoted ? out : undefined;
}

/** Splits on `separator` outside quoted strings. */
function splitOutsideQuotes(text: string, separator: RegExp): string[] {
  const parts: string[] = [];
  let current = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quoted && c === "\\") {
      current += c + (text[i + 1] ?? "");
      i++;
      continue;
    }
    if (c === '"') quoted = !quoted;
    if (!quoted && separator.test(c)) {
      parts.push(current);
      current = "";
    } else current += c;
  }
  parts.push(current);
  return parts.map((p) => p.trim());
}

/** The words of `text`, split on white space outside quoted strings. */
function words(text: string): string[] {
  return splitOutsideQuotes(text, /\s/).filter((w) => w !== "");
}

function unquote(value: string): string {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"'))
    return value.slice(1, -1).replace(/\\(.)/g, "$1");
  return value;
}

/** `key=value` around the first '=' (spaces around it allowed, as CFWS is). */
function keyValue(token: string): [string, string] | undefined {
  const at = token.indexOf("=");
  if (at <= 0) return undefined;
  return [token.slice(0, at).trim().toLowerCase(), unquote(token.slice(at + 1).trim())];
}

/** One resinfo (what follows a ';'), or undefined when it is not one. */
function parseResinfo(text: string): AuthResult | undefined {
  // "dmarc = fail" is as valid as "dmarc=fail": glue the '=' to its neighbours first.
  const tokens = words(text.replace(/\s*=\s*/g, "="));
  const spec = keyValue(tokens[0] ?? "");
  if (!spec) return undefined;
  const method = spec[0].split("/")[0]!.trim();
  const result = spec[1].toLowerCase();
  if (!/^[a-z0-9][a-z0-9_-]*$/.test(method) || !/^[a-z0-9_-]+$/.test(result)) return undefined;
  let reason: string | undefined;
  const properties: Record<string, string> = {};
  for (const token of tokens.slice(1)) {
    const kv = keyValue(token);
    if (!kv) continue;
    if (kv[0] === "reason") reason = kv[1];
    else if (kv[0].includes(".")) properties[kv[0]] = kv[1];
  }
  return { method, result, ...(reason !== undefined && { reason }), properties };
}

/** One Authentication-Results field's value (unfolded), or undefined when it cannot be read. */
export function parseAuthenticationResults(value: string): AuthenticationResults | undefined {
  if (value.length > MAX_FIELD_LENGTH) return undefined;
  const text = withoutComments(value.replace(/\r?\n[ \t]/g, " "));
  if (text === undefined) return undefined;
  const [head, ...resinfos] = splitOutsideQuotes(text, /;/);
  // The authserv-id, then an optional version number.
  const [id, version, ...extra] = words(head ?? "");
  if (id === undefined || extra.length > 0 || (version !== undefined && !/^\d+$/.test(version)))
    return undefined;
  const authservId = unquote(id).toLowerCase();
  if (!authservId) return undefined;
  if (resinfos.length === 1 && resinfos[0]!.trim().toLowerCase() === "none")
    return { authservId, results: [] };
  const results: AuthResult[] = [];
  for (const resinfo of resinfos.filter((r) => r !== "")) {
    const parsed = parseResinfo(resinfo);
    if (parsed) results.push(parsed);
  }
  return { authservId, results };
}

export interface DmarcVerdict {
  /** "pass", "fail", "none", "temperror", … as the trusted server wrote it. */
  readonly result: string;
  /** The From domain it judged (header.from), when it says. */
  readonly domain?: string;
}

/**
 * What the trusted server (`authservId`) said of DMARC, from a mail's Authentication-Results
 * fields, in the mail's order (the newest, added last, on top). Only the topmost field of the
 * trusted authserv-id counts: one below it came with the mail (the receiving server should have
 * removed it; a forger can add any), and fields of other authserv-ids, or above it, were written
 * by someone the bridge does not trust. Undefined: no trusted field, or it says nothing of DMARC.
 */
export function dmarcOf(fields: readonly string[], authservId: string): DmarcVerdict | undefined {
  const trusted = authservId.toLowerCase();
  for (const field of fields) {
    const parsed = parseAuthenticationResults(field);
    if (parsed?.authservId !== trusted) continue;
    const dmarc = parsed.results.find((r) => r.method === "dmarc");
    if (!dmarc) return undefined;
    const domain = dmarc.properties["header.from"];
    return { result: dmarc.result, ...(domain !== undefined && { domain }) };
  }
  return undefined;
}
