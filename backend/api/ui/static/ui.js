// sonoseg dashboard: confirmations for the two buttons that change data, and live updates by polling
// a JSON endpoint of the same origin. No framework, no build step; text is set with textContent only.
"use strict";
(function () {
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  function poll(element, onData) {
    var url = element.getAttribute("data-poll-url");
    var every = parseInt(element.getAttribute("data-poll-ms") || "2000", 10);
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)); })
        .then(function (data) { if (onData(data) !== false) { window.setTimeout(tick, every); } })
        .catch(function () { window.setTimeout(tick, every * 2); });
    }
    window.setTimeout(tick, every);
  }

  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) + " UTC" : "-"; }
  function fixed(v, digits) { return v === null || v === undefined ? "" : Number(v).toFixed(digits); }

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    if (text !== undefined && text !== null) { td.textContent = text; }
    row.appendChild(td);
    return td;
  }
  function muted(td, text) {
    var div = document.createElement("div");
    div.className = "muted";
    div.textContent = text;
    td.appendChild(div);
  }

  function runRows(body, runs) {
    var rows = [];
    runs.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-run", r.id);
      tr.setAttribute("data-status", r.status);
      var first = cell(tr, "#" + r.id);
      muted(first, r.trigger + (r.from_scratch ? ", from scratch" : "") + (r.attempts > 1 ? ", attempt " + r.attempts : ""));
      var status = document.createElement("span");
      status.className = "status status-" + r.status;
      status.textContent = r.status;
      cell(tr).appendChild(status);
      var phase = cell(tr, r.phase || "", "phase");
      if (r.fraction !== null && r.fraction !== undefined) {
        var bar = document.createElement("progress");
        bar.max = 1;
        bar.value = r.fraction;
        phase.appendChild(document.createTextNode(" "));
        phase.appendChild(bar);
        phase.appendChild(document.createTextNode(" " + (100 * r.fraction).toFixed(1) + " %"));
      }
      cell(tr, r.epoch === null ? "" : String(r.epoch), "num epoch");
      cell(tr, fixed(r.loss, 4), "num loss");
      cell(tr, fixed(r.val_dice, 3), "num");
      muted(cell(tr, r.worker || ""), r.device || "");
      muted(cell(tr, when(r.created_at)), when(r.started_at) + " / " + when(r.finished_at));
      var model = cell(tr);
      if (r.model_uid) {
        var code = document.createElement("code");
        code.textContent = r.model_uid;
        model.appendChild(code);
      }
      rows.push(tr);
      if (r.error) {
        var err = document.createElement("tr");
        err.className = "run-error";
        err.setAttribute("data-run-error", r.id);
        var td = cell(err);
        td.colSpan = 9;
        var pre = document.createElement("pre");
        pre.className = "error";
        pre.textContent = r.error;
        td.appendChild(pre);
        rows.push(err);
      }
    });
    if (!rows.length) {
      var empty = document.createElement("tr");
      empty.className = "empty-row";
      var td0 = cell(empty, "No training run yet.", "empty");
      td0.colSpan = 9;
      rows.push(empty);
    }
    body.replaceChildren.apply(body, rows);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var runs = document.getElementById("runs");
    if (runs) {
      var body = document.getElementById("runs-body");
      var stamp = document.getElementById("runs-updated");
      poll(runs, function (data) {
        runRows(body, data.runs);
        runs.setAttribute("data-polls", String(parseInt(runs.getAttribute("data-polls") || "0", 10) + 1));
        if (stamp) { stamp.textContent = "Last update " + new Date().toISOString().slice(11, 19) + " UTC."; }
      });
    }
    var progress = document.querySelector("[data-reload-when-current]");
    if (progress) {
      poll(progress, function (data) {
        if (data.current) { window.location.reload(); return false; }
        return true;
      });
    }
  });
})();
