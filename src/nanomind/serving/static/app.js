// The chat page: keeps conversations in localStorage, streams replies from /v1/chat/completions
// (SSE over fetch), shows reasoning in a collapsible block and tool calls as cards. No framework.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  load: () => JSON.parse(localStorage.getItem("nanomind.conversations") || "[]"),
  save: (list) => localStorage.setItem("nanomind.conversations", JSON.stringify(list)),
};
let conversations = store.load();
let current = null;     // {id, title, messages: [...]} (OpenAI message objects)
let controller = null;  // AbortController of the reply being streamed
let modelName = null;

function settings() {
  return {
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
    thinking: $("thinking").checked,
    system: $("system-prompt").value.trim(),
    apiKey: $("api-key").value.trim(),
  };
}

for (const id of ["temperature", "max-tokens", "thinking", "system-prompt"]) {
  const el = $(id), key = "nanomind.setting." + id, saved = localStorage.getItem(key);
  if (saved !== null) { if (el.type === "checkbox") el.checked = saved === "true"; else el.value = saved; }
  el.addEventListener("change", () => localStorage.setItem(key, el.type === "checkbox" ? el.checked : el.value));
}
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("temperature-value").textContent = $("temperature").value;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = settings().apiKey;
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    modelName = data.data[0].id;
    $("model-name").textContent = "model: " + modelName;
  } catch (e) {
    $("model-name").textContent = "model list unavailable (API key?)";
  }
}

// -- conversations ----------------------------------------------------------------------------

function newConversation() {
  current = { id: Date.now().toString(36), title: "New chat", messages: [] };
  conversations = [current].concat(conversations.filter((c) => c.messages.length));
  showConversation();
}

function showConversation() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.className = c === current ? "active" : "";
    li.addEventListener("click", () => { if (!controller) { current = c; showConversation(); } });
    list.appendChild(li);
  }
  const box = $("messages");
  box.replaceChildren();
  for (const m of current.messages) {
    if (m.role === "tool") { toolResultCard(box, m); continue; }
    const view = messageView(m.role);
    if (m.reasoning_content) setReasoning(view, m.reasoning_content, true);
    setContent(view, m.content || "");
    for (const call of m.tool_calls || []) toolCallCard(view, call);
  }
  box.scrollTop = box.scrollHeight;
}

function persist() {
  store.save(conversations.filter((c) => c.messages.length));
}

// -- message views ----------------------------------------------------------------------------

function messageView(role) {
  const el = document.createElement("div");
  el.className = "message " + role;
  el.dataset.role = role;
  const body = document.createElement("div");
  body.className = "content";
  el.appendChild(body);
  $("messages").appendChild(el);
  return el;
}

function setContent(view, text) {
  const body = view.querySelector(".content");
  body.replaceChildren(view.dataset.role === "assistant" ? renderMarkdown(text) : document.createTextNode(text));
}

function setReasoning(view, text, done) {
  let block = view.querySelector("details.thinking");
  if (!block) {
    block = document.createElement("details");
    block.className = "thinking";
    block.open = true;
    block.appendChild(document.createElement("summary"));
    const pre = document.createElement("div");
    pre.className = "reasoning";
    block.appendChild(pre);
    view.insertBefore(block, view.firstChild);
  }
  block.querySelector("summary").textContent = done ? "Thought" : "Thinking…";
  block.querySelector(".reasoning").textContent = text;
  if (done) block.open = false;
}

function toolCallCard(view, call) {
  const card = document.createElement("div");
  card.className = "tool-call";
  const title = document.createElement("div");
  title.className = "tool-title";
  title.textContent = "Tool call: " + call.function.name;
  const args = document.createElement("pre");
  args.textContent = call.function.arguments;
  card.append(title, args);
  view.appendChild(card);
}

function toolResultCard(box, message) {
  const card = document.createElement("div");
  card.className = "message tool";
  card.textContent = "Tool result: " + message.content;
  box.appendChild(card);
}

// -- sending and streaming --------------------------------------------------------------------

async function send(text) {
  if (!current) newConversation();
  const s = settings();
  current.messages.push({ role: "user", content: text });
  if (current.title === "New chat") current.title = text.slice(0, 40);
  showConversation();
  const view = messageView("assistant");
  view.classList.add("streaming");
  const reply = { role: "assistant", content: "", reasoning_content: "", tool_calls: [] };
  const messages = (s.system ? [{ role: "system", content: s.system }] : []).concat(current.messages);
  controller = new AbortController();
  setBusy(true);
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelName || undefined, messages, stream: true, temperature: s.temperature,
        max_tokens: s.max_tokens, chat_template_kwargs: { enable_thinking: s.thinking },
      }),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          const d = choice.delta || {};
          if (d.reasoning_content) { reply.reasoning_content += d.reasoning_content; setReasoning(view, reply.reasoning_content, false); }
          if (d.content) { reply.content += d.content; setContent(view, reply.content); }
          for (const call of d.tool_calls || []) { reply.tool_calls.push(call); toolCallCard(view, call); }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { const err = document.createElement("div"); err.className = "error"; err.textContent = "Error: " + e.message; view.appendChild(err); finish = "error"; }
  } finally {
    controller = null;
    setBusy(false);
    view.classList.remove("streaming");
    view.dataset.finish = finish || "";
    if (reply.reasoning_content) setReasoning(view, reply.reasoning_content, true);
    if (finish === "stopped") { const note = document.createElement("div"); note.className = "muted"; note.textContent = "(stopped)"; view.appendChild(note); }
    const saved = { role: "assistant", content: reply.content };
    if (reply.reasoning_content) saved.reasoning_content = reply.reasoning_content;
    if (reply.tool_calls.length) saved.tool_calls = reply.tool_calls.map(({ id, type, function: f }) => ({ id, type, function: f }));
    current.messages.push(saved);
    persist();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });

loadModel();
if (conversations.length) { current = conversations[0]; showConversation(); } else newConversation();
