// The playground: streams a chat completion (OpenAI's SSE format) into the transcript
// and shows time to first token, tokens/s and total latency.
(function () {
  "use strict";
  const root = document.getElementById("playground");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const transcript = $("pg-transcript");
  let history = [];
  let controller = null;

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = "turn turn-" + role;
    const who = document.createElement("strong");
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "turn-text";
    body.textContent = text;
    item.append(who, body);
    transcript.append(item);
    return body;
  }

  function showError(message) {
    const box = $("pg-error");
    box.textContent = message;
    box.hidden = !message;
  }

  async function send(event) {
    event.preventDefault();
    const message = $("pg-message").value.trim();
    if (!message) return;
    showError("");
    history.push({ role: "user", content: message });
    addTurn("user", message);
    $("pg-message").value = "";
    const output = addTurn("assistant", "");
    const messages = [];
    const system = $("pg-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const body = {
      model: $("pg-deployment").value,
      messages: messages.concat(history),
      stream: true,
      // A chunk may carry several tokens (the deployment's stream interval): the usage
      // chunk at the end says how many there were.
      stream_options: { include_usage: true },
      max_tokens: parseInt($("pg-max-tokens").value, 10) || 128,
    };
    const temperature = $("pg-temperature").value;
    if (temperature !== "") body.temperature = parseFloat(temperature);

    controller = new AbortController();
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    const started = performance.now();
    let firstToken = null;
    let lastText = null;
    let tokens = 0;
    let answer = "";
    try {
      const response = await fetch(root.dataset.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": root.dataset.csrf },
        body: JSON.stringify(body),
        signal: controller.signal,
        credentials: "same-origin",
      });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || "HTTP " + response.status);
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
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const data = JSON.parse(payload);
          if (data.error) throw new Error(data.error.message);
          if (data.usage) tokens = data.usage.completion_tokens;
          const delta = data.choices && data.choices[0] && data.choices[0].delta;
          if (delta && delta.content) {
            lastText = performance.now();
            if (firstToken === null) firstToken = lastText;
            answer += delta.content;
            output.textContent = answer;
          }
        }
      }
      history.push({ role: "assistant", content: answer });
    } catch (error) {
      if (error.name !== "AbortError") showError(error.message);
      history.pop();
    } finally {
      const total = performance.now() - started;
      if (firstToken !== null) {
        const rate =
          tokens > 1 && lastText > firstToken ? (tokens - 1) / ((lastText - firstToken) / 1000) : 0;
        $("pg-stats").textContent =
          "First token " + Math.round(firstToken - started) + " ms · " +
          rate.toFixed(1) + " tokens/s · " + tokens + " tokens in " + Math.round(total) + " ms";
      }
      $("pg-send").disabled = false;
      $("pg-stop").disabled = true;
      controller = null;
    }
  }

  $("pg-form").addEventListener("submit", send);
  $("pg-stop").addEventListener("click", () => controller && controller.abort());
  $("pg-clear").addEventListener("click", () => {
    history = [];
    transcript.replaceChildren();
    $("pg-stats").textContent = "";
    showError("");
  });
})();
