// The chat page: a conversation streamed from /v1/chat/completions. Model text is inserted as text.
"use strict";
const messages = [];  // the conversation, as the API takes it
let controller = null;  // aborts the stream in flight (the stop button)

const list = document.getElementById("messages");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  list.appendChild(div);
  list.scrollTop = list.scrollHeight;
  return div;
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
}

async function send(text) {
  hideError();
  messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const body = {
    messages,
    stream: true,
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
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
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            bubble.textContent = reply;
            list.scrollTop = list.scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
    messages.push({ role: "assistant", content: reply });
  }
}

document.getElementById("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
});

stopButton.addEventListener("click", () => controller && controller.abort());  // closing the stream frees the slot

document.getElementById("new").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  list.replaceChildren();
  hideError();
});

showModel();
