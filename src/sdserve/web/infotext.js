// A1111 infotext: read the PNG `parameters` tEXt chunk and parse it as A1111 does.

export async function pngInfotext(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const view = new DataView(bytes.buffer);
  let offset = 8; // PNG signature
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      if (latin1.decode(data.subarray(0, zero)) === "parameters") {
        if (type === "tEXt") return latin1.decode(data.subarray(zero + 1));
        // iTXt: keyword\0 compression flag, method, language\0, translated keyword\0, text
        let p = zero + 3;
        p = data.indexOf(0, p) + 1;
        p = data.indexOf(0, p) + 1;
        return utf8.decode(data.subarray(p));
      }
    }
    if (type === "IEND") break;
    offset += 12 + length;
  }
  return null;
}

// A value written as one JSON string (a prompt that spans lines or could pass for another field; a quoted
// parameter) reads back as that string, as sdserve's own parser (engine/infotext.py) reads it.
function unquote(value) {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
    try { return JSON.parse(value); } catch { /* not JSON: keep it as written */ }
  }
  return value;
}

const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines.at(-1) || "";
  const pairs = [...last.matchAll(PARAM)];
  if (pairs.length >= 3) lines.pop(); else last = "";
  const prompt = [], negative = [];
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) { inNegative = true; line = line.slice(16).trim(); }
    (inNegative ? negative : prompt).push(line);
  }
  const result = { Prompt: unquote(prompt.join("\n")), "Negative prompt": unquote(negative.join("\n")) };
  if (last) {
    for (const [, key, raw] of pairs) {
      result[key] = unquote(raw.trim());
    }
  }
  return result;
}
