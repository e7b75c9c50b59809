// One chart of the app: a plotly div that lives as long as its Streamlit key and is updated in place.
//
// Streamlit calls this function on every rerun with the new figure. The div is kept, so a new figure
// is one Plotly.react (plotly redraws only what changed) instead of a new chart mounted from scratch.
// plotly.js is served next to this file from the installed package: the browser never fetches it from
// anywhere else, and a classroom without a network draws the same charts.
const PLOTLY_URL = new URL("./plotly.min.js", import.meta.url).href;
let plotlyReady = null;

function loadPlotly() {
  // plotly.min.js is a UMD bundle: imported as a module it sets globalThis.Plotly and exports nothing.
  plotlyReady ??= window.Plotly ? Promise.resolve() : import(PLOTLY_URL);
  return plotlyReady.then(() => window.Plotly);
}

// ``chart_wire.pack``'s bytes: uint32 n, n bytes of JSON {config, failed, blobs, figure}, then the blobs, each
// from an 8-byte boundary. An array in the figure, {dtype, blob, shape}, becomes plotly.js's typed-array
// record with its own ArrayBuffer (plotly.js reads typed arrays from offset 0 of their buffer).
function unpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = view.getUint32(0, true);
  const head = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + n)));
  const pad = (k) => (8 - (k % 8)) % 8;
  let at = 4 + n + pad(4 + n);
  const blobs = head.blobs.map((length) => {
    const start = bytes.byteOffset + at;
    at += length + pad(length);
    return bytes.buffer.slice(start, start + length);
  });
  const join = (obj) => {
    if (Array.isArray(obj)) return obj.map(join);
    if (obj === null || typeof obj !== "object") return obj;
    if ("blob" in obj && "dtype" in obj) return { dtype: obj.dtype, bdata: blobs[obj.blob], shape: obj.shape };
    const out = {};
    for (const [k, v] of Object.entries(obj)) out[k] = join(v);
    return out;
  };
  head.figure = join(head.figure);
  return head;
}

export default function (component) {
  const { data, parentElement } = component;
  let el = parentElement.querySelector(":scope > .sa-plot");
  if (!el) {
    el = document.createElement("div");
    el.className = "sa-plot";
    parentElement.appendChild(el);
    // The column can change width without the window resizing (the sidebar folds away).
    el.saResize = new ResizeObserver(() => {
      if (el._fullLayout && window.Plotly) window.Plotly.Plots.resize(el);
    });
    el.saResize.observe(el);
  }
  // Only the newest figure is drawn: a rerun that lands while plotly.js loads replaces the one before it.
  const chart = unpack(data);
  el.saChart = chart;
  loadPlotly()
    .then((Plotly) => {
      if (el.saDrawn === el.saChart) return;
      const { figure, config } = (el.saDrawn = el.saChart);
      return Plotly.react(el, figure.data, figure.layout, { ...config, responsive: true });
    })
    .catch((err) => {
      el.textContent = chart.failed;
      console.error(err);
    });
  return () => {
    el.saResize?.disconnect();
    if (window.Plotly) window.Plotly.purge(el);
  };
}
