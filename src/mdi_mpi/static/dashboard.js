// The dashboard: polls /v1/status once a second. The server sends running totals; rates and shares
// are differences between polls, so the server keeps no per-viewer state.
"use strict";
const WINDOW = 5;  // polls (seconds) behind the "last 5 s" figures
const HISTORY = 60;  // points of the tokens/s chart
const samples = [];  // {t, generated, ranks}
const rates = [];  // tokens/s per poll, the chart's points

function bytes(n) {
  if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(2) + " GiB";
  if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(1) + " MiB";
  return (n / 2 ** 10).toFixed(0) + " KiB";
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function shares(now, then) {
  const dt = now.t - then.t;
  return now.ranks.map((r, i) => {
    const p = then.ranks[i];
    const f = (k) => (dt > 0 ? Math.max(0, Math.min(1, (r[k] - p[k]) / dt)) : 0);
    return { busy: f("busy_s"), waiting: f("waiting_s"), sending: f("sending_s") };
  });
}

function drawRanks(status, share) {
  const body = document.querySelector("#ranks tbody");
  body.replaceChildren();
  status.ranks.forEach((r, i) => {
    const row = document.createElement("tr");
    row.dataset.rank = r.rank;
    cell(row, r.rank);
    cell(row, r.host);
    cell(row, r.layers[0] + "–" + (r.layers[1] - 1));
    cell(row, bytes(r.weight_bytes));
    cell(row, bytes(r.kv_cache_bytes));
    cell(row, r.peak_rss_bytes ? bytes(r.peak_rss_bytes) : "–");
    const bars = document.createElement("div");
    bars.className = "bars";
    const s = share[i] || { busy: 0, waiting: 0, sending: 0 };
    for (const [name, value] of [["busy", s.busy], ["wait", s.waiting], ["send", s.sending]]) {
      const span = document.createElement("span");
      span.className = name;
      span.style.width = (100 * value).toFixed(1) + "%";
      span.title = name + " " + (100 * value).toFixed(0) + "%";
      bars.appendChild(span);
    }
    cell(row, "").appendChild(bars);
    body.appendChild(row);
  });
}

function drawChart() {
  const canvas = document.getElementById("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...rates);
  g.strokeStyle = "#dde1e6";
  g.beginPath(); g.moveTo(pad, h - pad); g.lineTo(w, h - pad); g.stroke();
  g.fillStyle = "#66707a";
  g.font = "11px system-ui";
  g.fillText(top.toFixed(1), 2, 12);
  g.fillText("0", 2, h - pad);
  g.strokeStyle = "#2364aa";
  g.lineWidth = 2;
  g.beginPath();
  rates.forEach((v, i) => {
    const x = pad + ((w - pad) * (i + HISTORY - rates.length)) / (HISTORY - 1);
    const y = h - pad - ((h - pad - 8) * v) / top;
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

function drawRing(status, share) {
  const svg = document.getElementById("ring");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const n = status.ranks.length, cx = 120, cy = 80, radius = 55;
  const at = (i) => [cx + radius * Math.sin((2 * Math.PI * i) / n), cy - radius * Math.cos((2 * Math.PI * i) / n)];
  const circle = document.createElementNS(ns, "circle");
  Object.entries({ cx, cy, r: radius, fill: "none", stroke: "#dde1e6", "stroke-width": 3 }).forEach(([k, v]) => circle.setAttribute(k, v));
  svg.appendChild(circle);
  status.ranks.forEach((r, i) => {
    const [x, y] = at(i);
    const busy = share[i] ? share[i].busy : 0;
    const dot = document.createElementNS(ns, "circle");
    const shade = Math.round(235 - 160 * busy);
    Object.entries({ cx: x, cy: y, r: 18, fill: `rgb(${shade},${Math.round(245 - 60 * busy)},${shade})`, stroke: "#2a9d5b" })
      .forEach(([k, v]) => dot.setAttribute(k, v));
    svg.appendChild(dot);
    const label = document.createElementNS(ns, "text");
    Object.entries({ x, y: y + 4, "text-anchor": "middle", "font-size": 11 }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = r.rank;
    svg.appendChild(label);
  });
  const text = document.createElementNS(ns, "text");
  Object.entries({ x: cx, y: cy + 4, "text-anchor": "middle", "font-size": 10, fill: "#66707a" }).forEach(([k, v]) => text.setAttribute(k, v));
  text.textContent = status.groups + " groups, " + status.running + "/" + status.slots + " slots";
  svg.appendChild(text);
}

async function poll() {
  try {
    const response = await apiFetch("/v1/status");
    if (!response.ok) throw new Error(await errorText(response));
    const status = await response.json();
    hideError();
    document.getElementById("model").textContent = status.model;
    samples.push({ t: status.uptime_s, generated: status.generated_tokens, ranks: status.ranks });
    if (samples.length > WINDOW + 1) samples.shift();
    const first = samples[0], last = samples[samples.length - 1];
    const prev = samples[samples.length - 2] || last;
    const span = last.t - first.t;
    const tps = span > 0 ? (last.generated - first.generated) / span : 0;
    if (prev !== last) rates.push((last.generated - prev.generated) / Math.max(1e-3, last.t - prev.t));
    if (rates.length > HISTORY) rates.shift();
    const share = samples.length > 1 ? shares(last, first) : [];
    document.getElementById("tps").textContent = tps.toFixed(1);
    document.getElementById("slots").textContent = status.running + " / " + status.slots;
    document.getElementById("waiting").textContent = status.waiting;
    document.getElementById("generated").textContent = status.generated_tokens;
    document.getElementById("cached").textContent = status.prompt_tokens
      ? (100 * status.prompt_tokens_cached / status.prompt_tokens).toFixed(0) + "%"
      : "–";
    const ms = (s) => (s === null ? "–" : (1000 * s).toFixed(0) + " ms");
    document.getElementById("ttft").textContent = ms(status.ttft_p50_s) + " / " + ms(status.ttft_p95_s);
    drawRanks(status, share);
    drawChart();
    drawRing(status, share);
  } catch (e) {
    showError("No status from the server: " + e.message);
  }
  setTimeout(poll, 1000);
}

poll();
