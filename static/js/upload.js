// Upload with a live progress bar. XMLHttpRequest is used because fetch() cannot
// report upload progress; the server answers JSON with the new version's URL.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const status = document.getElementById("upload-status");
  const bar = document.getElementById("upload-progress");
  const percent = document.getElementById("upload-percent");
  const message = document.getElementById("upload-message");

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.url);
    xhr.setRequestHeader("X-CSRFToken", data.get("csrfmiddlewaretoken"));
    status.hidden = false;
    message.textContent = "Uploading…";
    form.querySelector("button").disabled = true;
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      const pct = Math.round((e.loaded / e.total) * 100);
      bar.value = pct;
      percent.textContent = pct + "%";
      if (pct === 100) {
        message.textContent = form.dataset.receivedMessage || "Received; checking the file…";
      }
    });
    xhr.addEventListener("load", () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status === 200 || xhr.status === 201) {
        window.location = body.url;
      } else {
        message.textContent = body.error || body.detail || ("Upload failed (HTTP " + xhr.status + ").");
        message.className = "error";
        form.querySelector("button").disabled = false;
      }
    });
    xhr.addEventListener("error", () => {
      message.textContent = "The connection broke off; nothing was stored. Try again.";
      message.className = "error";
      form.querySelector("button").disabled = false;
    });
    xhr.send(data);
  });
});
