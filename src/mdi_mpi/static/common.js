// Shared by the pages: the API key (asked once, kept in this tab's session storage) and JSON calls.
"use strict";
const KEY_NAME = "mdi-mpi-api-key";

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: "Bearer " + key } : {};
}

// Show the key form; resolves once the user has given a key.
function askForKey(message) {
  const form = document.getElementById("keyform");
  const input = document.getElementById("key");
  form.classList.remove("hidden");
  if (message) showError(message);
  input.focus();
  return new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_NAME, input.value);
      form.classList.add("hidden");
      hideError();
      resolve();
    };
  });
}

function showError(text) {
  const box = document.getElementById("error");
  box.textContent = text;  // text, never HTML
  box.classList.remove("hidden");
}

function hideError() {
  document.getElementById("error").classList.add("hidden");
}

// fetch with the key; a 401 asks for the key (again) and retries.
async function apiFetch(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    if (response.status !== 401) return response;
    const had = sessionStorage.getItem(KEY_NAME) !== null;
    await askForKey(had ? "Wrong API key: " + (await errorText(response)) : null);
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function showModel() {
  const response = await apiFetch("/v1/models");
  if (response.ok) {
    const body = await response.json();
    document.getElementById("model").textContent = body.data.map((m) => m.id).join(", ");
  }
}
