/**
 * Export files behind a URL (browsers, React Native): fetched, hashed with WebCrypto. A file's bytes are
 * kept after hashing so the session is built from the very bytes that were verified, without a
 * second download.
 */

/**
 * @param {string} base  the directory's URL
 * @param {Map<string, Uint8Array>} [cache]  shared by sub-directories
 * @returns {import("./node-files.js").Files}
 */
export function urlFiles(base, cache = new Map()) {
  const root = base.endsWith("/") ? base : `${base}/`;
  const name = (rel) => new URL(rel, root).href;
  async function bytes(rel) {
    const url = name(rel);
    if (cache.has(url)) return cache.get(url);
    const response = await fetch(url);
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
    const data = new Uint8Array(await response.arrayBuffer());
    cache.set(url, data);
    return data;
  }
  return {
    where: root,
    name,
    async text(rel) {
      const data = await bytes(rel);
      return data === null ? null : new TextDecoder().decode(data);
    },
    async digest(rel) {
      const data = await bytes(rel);
      if (data === null) return null;
      const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
      return { bytes: data.length, sha256: Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("") };
    },
    sub: (rel) => urlFiles(name(rel.endsWith("/") ? rel : `${rel}/`), cache),
    async session(ort, rel, dataRel, options) {
      const [model, data] = [await bytes(rel), await bytes(dataRel)];
      if (model === null) throw new Error(`${name(rel)} is missing`);
      const externalData = data === null ? [] : [{ path: dataRel, data }];
      const session = await ort.InferenceSession.create(model, { ...options, externalData });
      cache.delete(name(rel));  // onnxruntime holds its own copy now
      cache.delete(name(dataRel));
      return session;
    },
  };
}
