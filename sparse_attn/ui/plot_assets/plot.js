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
  // ``data`` is the UTF-8 JSON of {config, failed, figure}. Only the newest figure is drawn: a rerun
  // that lands while plotly.js loads replaces the one before it.
  const chart = JSON.parse(new TextDecoder().decode(data));
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
