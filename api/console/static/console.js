// The console's only script (the pages' CSP allows no other): reload a job or batch page until it ends, and keep
// the queues page live by polling /console/live.json. Values go in with textContent, never as HTML.
"use strict";

function refreshLater(main) {
  const seconds = Number(main.dataset.refreshS);
  if (seconds > 0) setTimeout(() => { if (!document.hidden) location.reload(); else refreshLater(main); }, seconds * 1000);
}

function chartPoints(series, width, height) {
  const top = Math.max(...series, 0.001);
  const step = width / Math.max(series.length - 1, 1);
  return series.map((v, i) => `${(i * step).toFixed(1)},${(height - v / top * height).toFixed(1)}`).join(" ");
}

function setCell(row, field, value) {
  const cell = row.querySelector(`[data-field="${field}"]`);
  if (cell) cell.textContent = value;
}

function workerRow(tbody, worker) {
  let row = [...tbody.rows].find((r) => r.dataset.worker === worker.name);
  if (!row) {
    row = tbody.insertRow();
    row.dataset.worker = worker.name;
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = worker.name;
    row.appendChild(name);
    const plain = [worker.model, worker.device, worker.max_batch, `${worker.largest_batch ?? "–"} / ${worker.mean_batch ?? "–"}`];
    for (const value of plain) row.insertCell().textContent = value ?? "–";
    for (const field of ["jobs", "jobs_rate", "tokens_rate"]) row.insertCell().dataset.field = field;
  }
  return row;
}

function showLive(data, previous) {
  for (const q of data.queues) {
    const row = document.querySelector(`#queues tr[data-model="${CSS.escape(q.model)}"]`);
    if (row) for (const field of ["queued", "queued_for_key", "live_workers", "starting_workers", "jobs_per_s"]) setCell(row, field, q[field]);
  }
  const tbody = document.querySelector("#workers tbody");
  const live = new Set(data.workers.map((w) => w.name));
  for (const row of [...tbody.rows]) if (!live.has(row.dataset.worker)) row.remove();
  for (const worker of data.workers) {
    const row = workerRow(tbody, worker);
    setCell(row, "jobs", worker.jobs ?? 0);
    const before = previous && previous.workers.find((w) => w.name === worker.name);
    if (before) {
      const dt = data.at - previous.at;
      setCell(row, "jobs_rate", (((worker.jobs ?? 0) - (before.jobs ?? 0)) / dt).toFixed(2));
      setCell(row, "tokens_rate", (((worker.tokens ?? 0) - (before.tokens ?? 0)) / dt).toFixed(1));
    }
  }
  document.getElementById("chart-line").setAttribute("points", chartPoints(data.jobs_per_s, 600, 120));
  document.getElementById("chart-peak").textContent = Math.max(...data.jobs_per_s, 0);
}

function pollLive(main) {
  const state = document.getElementById("live-state");
  let previous = null;
  const poll = async () => {
    try {
      const response = await fetch(main.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      showLive(data, previous);
      previous = data;
      state.textContent = `Updated ${new Date(data.at * 1000).toLocaleTimeString()}.`;
    } catch (error) {
      state.textContent = `Could not update: ${error.message}.`;
    }
    setTimeout(poll, 2000);
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.getElementById("main");
  if (main.dataset.refreshS) refreshLater(main);
  if (main.dataset.live) pollLive(main);
});
