// fleetserve's chat page: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

async function loadModels() {
  const select = $("model");
  const previous = select.value || localStorage.getItem("fleetserve.model");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { setStatus(await errorMessage(response)); return; }
  const names = (await response.json()).data.map((m) => m.id);
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.includes(previous)) select.value = previous;
  setStatus(names.length ? "" : "no model is being served yet");
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.dataset.role = role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// The text pieces (and the usage, if sent) of an OpenAI server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (data.error) throw new Error(data.error.message || "the stream failed");
        yield data;
      }
    }
  }
}

async function send(text) {
  const model = $("model").value;
  if (!model) { setStatus("pick a model first"); return; }
  localStorage.setItem("fleetserve.model", model);
  state.history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.dataset.model = model;
  const body = {
    model,
    messages: state.history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let tokens = null;
  let note = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of events(response)) {
      if (data.usage) tokens = data.usage.completion_tokens;
      for (const choice of data.choices || []) {
        const piece = (choice.delta || {}).content;
        if (!piece) continue;
        if (first === null) first = performance.now() - started;
        pieces += 1;
        answer.textContent += piece;
        answer.scrollIntoView({ block: "end" });
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      note = "stopped · ";  // the gateway closes the engine's stream: generation stops there too
    } else {
      answer.className = "message error";
      answer.textContent = error.message;
    }
  } finally {
    busy(false);
    state.controller = null;
  }
  state.history.push({ role: "assistant", content: answer.textContent });
  const elapsed = performance.now() - started;
  const count = tokens ?? pieces;
  const rate = first !== null && elapsed > first ? (count / ((elapsed - first) / 1000)).toFixed(1) : "–";
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.dataset.testid = "stats";
  stats.textContent = `${note}${model} · first token ${first === null ? "–" : first.toFixed(0)} ms · ${rate} tokens/s · ${count} tokens`;
  answer.append(stats);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
$("api-key").value = localStorage.getItem("fleetserve.apiKey") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("fleetserve.apiKey", $("api-key").value.trim()); loadModels(); });
setInterval(loadModels, 10000);  // models come and go with their workers
loadModels();
