// The r1kit chat page: a multi-turn chat over POST /v1/chat/completions, streamed as server-sent events.
// The thinking (delta.reasoning_content) fills a collapsible block above each answer (delta.content); the
// final usage chunk gives each reply's token count and cost. Earlier answers go back to the model without
// their reasoning, as R1 advises. Text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "max-tokens", "seed", "api-key"];
const state = { model: null, history: [], controller: null };

function setStatus(text) {
  $("status").textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function errorText(status, body) {
  const message = (body && body.error && body.error.message) || "HTTP " + status;
  return status === 401 ? message + " Set the API key under Settings." : message;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(errorText(r.status, body));
    state.model = body.data[0].id;
    $("model").textContent = state.model;
    setStatus("");
  } catch (e) {
    $("model").textContent = "no model";
    setStatus("Cannot list the models: " + e.message);
    if (String(e.message).includes("API key")) $("settings").open = true;
  }
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function addUserTurn(text) {
  const empty = document.querySelector("#messages .empty");
  if (empty) empty.remove();
  const turn = element("div", "turn user");
  turn.append(element("div", "text", text));
  $("messages").append(turn);
}

function addAssistantTurn() {
  const turn = element("div", "turn assistant");
  const thinking = element("details", "thinking");
  thinking.open = true;
  thinking.hidden = true;
  const summary = element("summary", null, "Thinking…");
  const reasoning = element("div", "reasoning");
  thinking.append(summary, reasoning);
  const answer = element("div", "answer");
  const meta = element("div", "meta", "waiting for the model…");
  turn.append(thinking, answer, meta);
  $("messages").append(turn);
  return { turn, thinking, summary, reasoning, answer, meta };
}

function scrollDown() {
  window.scrollTo(0, document.body.scrollHeight);
}

function formatCost(usd) {
  if (typeof usd !== "number") return "";
  return "$" + (usd >= 0.01 ? usd.toFixed(4) : usd.toPrecision(2));
}

function describe(usage, seconds, finish) {
  const parts = [];
  if (usage) {
    const details = usage.completion_tokens_details || {};
    const thinking = details.reasoning_tokens ? ` (${details.reasoning_tokens} thinking)` : "";
    parts.push(`${usage.completion_tokens} tokens${thinking}`);
    const cached = usage.prompt_cache_hit_tokens ? `, ${usage.prompt_cache_hit_tokens} cached` : "";
    parts.push(`prompt ${usage.prompt_tokens}${cached}`);
    parts.push(formatCost(usage.cost));
  }
  parts.push(`${seconds.toFixed(1)} s`);
  if (finish === "length") parts.push("stopped at the length limit");
  return parts.filter(Boolean).join(" · ");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

function requestBody() {
  const body = {
    model: state.model,
    messages: state.history,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  const seed = parseInt($("seed").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  if (!Number.isNaN(seed)) body.seed = seed;
  return body;
}

// Calls onEvent with each JSON event of a server-sent event stream.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data && data !== "[DONE]") onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  addUserTurn(text);
  state.history.push({ role: "user", content: text });
  const view = addAssistantTurn();
  scrollDown();
  const started = performance.now();
  let answer = "", usage = null, finish = null, firstToken = null;
  state.controller = new AbortController();
  setBusy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(r.status, body));
    }
    view.meta.textContent = "generating…";
    await readEvents(r, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        const reasoning = delta.reasoning_content || "";
        if (reasoning) {
          if (firstToken === null) firstToken = performance.now();
          view.thinking.hidden = false;
          view.reasoning.textContent += reasoning;
        }
        if (delta.content) {
          if (firstToken === null) firstToken = performance.now();
          if (!answer && !view.thinking.hidden) {
            const s = ((performance.now() - started) / 1000).toFixed(1);
            view.summary.textContent = `Thought for ${s} s`;
          }
          answer += delta.content;
          view.answer.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    });
    if (!view.thinking.hidden && !answer) view.summary.textContent = "Thinking (no answer yet)";
    view.meta.textContent = describe(usage, (performance.now() - started) / 1000, finish);
  } catch (e) {
    if (e.name === "AbortError") {
      view.turn.classList.add("stopped");
      view.meta.textContent = "stopped · " + ((performance.now() - started) / 1000).toFixed(1) + " s";
    } else {
      view.turn.classList.add("error");
      view.meta.textContent = "error: " + e.message;
      if (String(e.message).includes("API key")) $("settings").open = true;
    }
  } finally {
    state.history.push({ role: "assistant", content: answer });  // without its reasoning, as R1 advises
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function restoreSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("r1kit." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => {
      localStorage.setItem("r1kit." + id, $(id).value);
      if (id === "api-key") loadModel();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  restoreSettings();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren(element("p", "empty", "New chat. Ask something."));
  });
  loadModel();
  $("prompt").focus();
});
