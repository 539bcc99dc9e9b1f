// The console's pages: sign in, generate (live progress, preview, cancel), the gallery of the
// user's jobs, checkpoints (list, upload), endpoints and trainings (status, loss curve).
import { ApiError, call, follow, put, signIn, signInWithPassword, signOut, signedIn } from "./api.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["signin", "generate", "gallery", "checkpoints", "endpoints", "trainings"];
const FINISHED = ["succeed", "failed", "canceled"];
const MiB = 1024 * 1024;
const PART = 8 * MiB; // every part but the last at least 5 MiB, as storage wants

let running = null; // the job the generate page follows: {id, abort}
let shown = null; // the job the gallery's detail shows
const losses = new Map(); // training id -> [[step, loss]] heard from the event stream

// --- small helpers ------------------------------------------------------------------------

function element(tag, { dataset = {}, ...properties } = {}, ...children) {
  const made = Object.assign(document.createElement(tag), properties);
  Object.assign(made.dataset, dataset);
  made.append(...children.filter((child) => child !== null && child !== undefined));
  return made;
}

function row(cells, onClick) {
  const tr = element("tr", {}, ...cells.map((cell) => element("td", { textContent: cell ?? "" })));
  if (onClick) {
    tr.className = "clickable";
    tr.addEventListener("click", onClick);
  }
  return tr;
}

function when(value) {
  const seconds = Number(value);
  const date = Number.isFinite(seconds) && seconds > 1e9 ? new Date(seconds * 1000) : new Date(String(value).replace(" ", "T"));
  return Number.isNaN(date.getTime()) ? String(value ?? "") : date.toLocaleString();
}

function showError(error) {
  $("error").textContent = error instanceof ApiError ? error.message : `error: ${error.message || error}`;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

async function guarded(work) {
  clearError();
  try {
    return await work();
  } catch (error) {
    if (error.name !== "AbortError") showError(error);
  }
}

// --- navigation ---------------------------------------------------------------------------

const loaders = {
  generate: loadChoices,
  gallery: loadGallery,
  checkpoints: loadCheckpoints,
  endpoints: loadEndpoints,
  trainings: loadTrainings,
};

function show(view) {
  for (const name of VIEWS) $(name).hidden = name !== view;
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (loaders[view]) guarded(loaders[view]);
}

function signedInAs(who) {
  $("nav").hidden = !who;
  $("sign-out").hidden = !who;
  $("who").textContent = who ? `signed in as ${who.user}` : "";
  show(who ? "generate" : "signin");
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(async () => {
    const [apiKey, user, password] = [$("api-key").value.trim(), $("user").value.trim(), $("password").value];
    $("password").value = "";
    if (password) await signInWithPassword(apiKey, user, password).catch((error) => { signOut(); throw error; });
    else signIn(apiKey, user);
    try {
      await call("GET", `/users?username=${encodeURIComponent(signedIn().user)}`); // 401: no such user
    } catch (error) {
      await signOut();
      throw error;
    }
    followTrainings();
    signedInAs(signedIn());
  });
});

$("sign-out").addEventListener("click", () => {
  guarded(async () => {
    await signOut();
    signedInAs(null);
  });
});

for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => show(button.dataset.view));
}
for (const button of document.querySelectorAll("button.refresh")) {
  button.addEventListener("click", () => guarded(loaders[button.dataset.refresh]));
}

// --- generate -----------------------------------------------------------------------------

async function activeCheckpoints(type) {
  const data = await call("GET", `/checkpoints?types=${encodeURIComponent(type)}&status=Active&per_page=500`);
  return data.checkpoints.flatMap((checkpoint) => checkpoint.name);
}

async function loadChoices() {
  const [models, loras, endpoints] = await Promise.all([
    activeCheckpoints("Stable-diffusion"),
    activeCheckpoints("Lora"),
    call("GET", "/endpoints?limit=100"),
  ]);
  const model = $("model");
  const chosen = model.value;
  model.replaceChildren(...models.map((name) => element("option", { value: name, textContent: name })));
  if (models.includes(chosen)) model.value = chosen;
  const endpoint = $("endpoint");
  const chosenEndpoint = endpoint.value;
  endpoint.replaceChildren(
    element("option", { value: "", textContent: "automatic" }),
    ...endpoints.endpoints
      .filter((item) => item.endpoint_status === "InService")
      .map((item) => element("option", { value: item.endpoint_name, textContent: `${item.endpoint_name} (${item.endpoint_type})` })),
  );
  endpoint.value = [...endpoint.options].some((option) => option.value === chosenEndpoint) ? chosenEndpoint : "";
  const box = $("loras");
  const weights = Object.fromEntries([...box.querySelectorAll(".lora")].map((item) => [item.dataset.name, item]));
  box.replaceChildren(
    ...(loras.length
      ? loras.map(
          (name) =>
            weights[name] ||
            element(
              "label",
              { className: "lora", dataset: { name } },
              element("input", { type: "checkbox", value: name }),
              name,
              element("input", { type: "number", step: "0.05", value: "0.8", title: "weight" }),
            ),
        )
      : [element("span", { className: "hint", textContent: "no Lora checkpoints" })]),
  );
}

function chosenLoras() {
  return [...$("loras").querySelectorAll(".lora")]
    .filter((item) => item.querySelector("input[type=checkbox]").checked)
    .map((item) => ({ name: item.dataset.name, weight: Number(item.querySelector("input[type=number]").value) }));
}

function stem(name) {
  return name.replace(/\.[^.]+$/, "");
}

function settings() {
  const loras = chosenLoras();
  const tags = loras.map((lora) => ` <lora:${stem(lora.name)}:${lora.weight}>`).join("");
  return {
    payload: {
      prompt: $("prompt").value + tags,
      negative_prompt: $("negative").value,
      sampler_name: $("sampler").value,
      width: Number($("width").value),
      height: Number($("height").value),
      steps: Number($("steps").value),
      cfg_scale: Number($("cfg").value),
      seed: Number($("seed").value),
      batch_size: Number($("batch").value),
      n_iter: 1,
    },
    models: { "Stable-diffusion": [$("model").value], ...(loras.length ? { Lora: loras.map((lora) => lora.name) } : {}) },
  };
}

$("generate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(generate);
});

async function generate() {
  const { payload, models } = settings();
  const endpoint = $("endpoint").value;
  const endpointType = endpoint ? $("endpoint").selectedOptions[0].textContent.match(/\((.+)\)$/)[1] : "Async";
  const body = {
    task_type: "txt2img",
    inference_type: endpointType,
    models,
    payload_string: JSON.stringify(payload),
    preview_every: Math.max(1, Math.floor(payload.steps / 5)),
    ...(endpoint ? { sagemaker_endpoint_name: endpoint } : {}),
  };
  $("results").replaceChildren();
  $("job-status").textContent = "";
  delete $("job-status").dataset.status;
  setRunning({ id: null, abort: new AbortController() }, "submitting");
  try {
    const started = await call("POST", "/inferences", body);
    const id = started.inference ? started.inference.inference_id : started.InferenceJobId;
    running.id = id;
    $("cancel-button").disabled = false;
    progressText("queued");
    if (!started.inference) return finished(started); // a Real-time endpoint answers when done
    await follow(`/inferences/${id}/events`, onJobEvent, running.abort.signal).catch((error) => {
      if (error.name !== "AbortError") throw error;
    });
    finished(await call("GET", `/inferences/${id}`));
  } finally {
    setRunning(null);
  }
}

function onJobEvent(event) {
  if (event.type === "inference.started") progressText("running");
  if (event.type === "inference.progress") {
    $("progress").max = event.data.total;
    $("progress").value = event.data.step;
    const eta = event.data.eta != null ? `, ${event.data.eta.toFixed(1)} s left` : "";
    progressText(`step ${event.data.step}/${event.data.total}${eta}`);
    if (event.data.preview) {
      $("preview").src = event.data.preview;
      $("preview").hidden = false;
    }
  }
  return ["inference.succeeded", "inference.failed", "inference.canceled"].includes(event.type);
}

function progressText(text) {
  $("progress-text").textContent = text;
}

function setRunning(job, text = "") {
  running = job;
  if (job) $("run").hidden = false; // and after the job, its last progress stays in view
  $("generate-button").disabled = Boolean(job);
  $("cancel-button").disabled = !job || !job.id;
  if (job) {
    $("progress").removeAttribute("value");
    $("preview").hidden = true;
    progressText(text);
  }
}

function finished(job) {
  $("job-status").textContent = `job ${job.InferenceJobId}: ${job.status}` + (job.error ? ` (${job.error})` : "");
  $("job-status").dataset.status = job.status;
  $("results").replaceChildren(
    ...job.img_presigned_urls.map((url, index) =>
      element("a", { href: url, target: "_blank" }, element("img", { src: url, alt: job.image_names[index] })),
    ),
  );
}

$("cancel-button").addEventListener("click", () =>
  guarded(async () => {
    if (!running || !running.id) return;
    $("cancel-button").disabled = true;
    await call("PUT", `/inferences/${running.id}/cancel`);
  }),
);

// --- gallery ------------------------------------------------------------------------------

async function loadGallery() {
  const pages = await Promise.all(["txt2img", "img2img"].map((type) => call("GET", `/inferences?type=${type}&limit=48`)));
  const jobs = pages
    .flatMap((page) => page.inferences)
    .sort((a, b) => String(b.createTime).localeCompare(String(a.createTime)));
  $("gallery-grid").replaceChildren(
    ...jobs.map((job) => {
      const card = element(
        "div",
        { className: "card", dataset: { id: job.InferenceJobId } },
        job.img_presigned_urls.length ? element("img", { src: job.img_presigned_urls[0], alt: "thumbnail" }) : null,
        element("p", { className: "status", textContent: job.status }),
        element("p", { textContent: (job.info && job.info.prompt) || job.taskType }),
        element("p", { className: "hint", textContent: when(job.createTime) }),
      );
      card.addEventListener("click", () => showJob(job));
      return card;
    }),
  );
}

function showJob(job) {
  shown = job;
  const info = job.info || {};
  $("detail").hidden = false;
  $("detail-images").replaceChildren(
    ...job.img_presigned_urls.map((url) => element("a", { href: url, target: "_blank" }, element("img", { src: url, alt: "image" }))),
  );
  $("detail-parameters").textContent =
    (info.infotexts && info.infotexts[0]) || job.error || `${job.status}${job.progress ? `: step ${job.progress.step}/${job.progress.steps}` : ""}`;
  $("reuse").hidden = !info.prompt;
  $("detail-cancel").hidden = FINISHED.includes(job.status);
}

$("reuse").addEventListener("click", () => {
  const info = shown.info;
  $("prompt").value = info.prompt.replace(/\s*<lora:[^>]+>/g, "");
  $("negative").value = info.negative_prompt || "";
  $("steps").value = info.steps;
  $("width").value = info.width;
  $("height").value = info.height;
  $("cfg").value = info.cfg_scale;
  $("seed").value = info.seed;
  $("batch").value = info.batch_size;
  const sampler = info.scheduler && info.scheduler !== "Automatic" && info.scheduler !== "Uniform" ? `${info.sampler_name} ${info.scheduler}` : info.sampler_name;
  const options = [...$("sampler").options].map((option) => option.value);
  $("sampler").value = options.includes(sampler) ? sampler : info.sampler_name;
  const model = (shown.params.used_models["Stable-diffusion"] || [])[0];
  show("generate");
  loadChoices().then(() => {
    if (model) $("model").value = model.model_name;
    const weights = info.lora_weights || {};
    for (const item of $("loras").querySelectorAll(".lora")) {
      const weight = weights[stem(item.dataset.name)];
      item.querySelector("input[type=checkbox]").checked = weight !== undefined;
      if (weight !== undefined) item.querySelector("input[type=number]").value = weight;
    }
  }, showError);
});

$("detail-cancel").addEventListener("click", () =>
  guarded(async () => {
    showJob(await call("PUT", `/inferences/${shown.InferenceJobId}/cancel`));
    await loadGallery();
  }),
);

// --- checkpoints --------------------------------------------------------------------------

async function loadCheckpoints() {
  const data = await call("GET", "/checkpoints?per_page=500");
  $("checkpoint-rows").replaceChildren(
    ...data.checkpoints.map((item) => row([item.name.join(", "), item.type, item.status, when(item.created), item.id])),
  );
}

$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(upload);
});

async function upload() {
  const files = [...$("upload-files").files];
  const total = files.reduce((sum, file) => sum + file.size, 0) || 1;
  const partsOf = (file) => Math.max(1, Math.ceil(file.size / Math.max(PART, Math.ceil(file.size / 100 / MiB) * MiB)));
  const created = await call("POST", "/checkpoints", {
    checkpoint_type: $("upload-type").value,
    filenames: files.map((file) => ({ filename: file.name, parts_number: partsOf(file) })),
  });
  const bar = $("upload-progress");
  bar.hidden = false;
  bar.max = total;
  const sent = new Map();
  const moved = () => {
    bar.value = [...sent.values()].reduce((a, b) => a + b, 0);
    $("upload-text").textContent = `${Math.round((100 * bar.value) / total)}%`;
  };
  const tags = {};
  for (const file of files) {
    const urls = created.s3PresignUrl[file.name];
    const size = Math.ceil(file.size / urls.length);
    // three parts at a time, straight to storage
    const parts = urls.map((url, index) => ({ url, index }));
    tags[file.name] = [];
    const lanes = Array.from({ length: 3 }, async () => {
      for (let part = parts.shift(); part; part = parts.shift()) {
        const key = `${file.name}#${part.index}`;
        const blob = file.slice(part.index * size, Math.min(file.size, (part.index + 1) * size));
        const etag = await put(part.url, blob, (loaded) => {
          sent.set(key, loaded);
          moved();
        });
        sent.set(key, blob.size);
        moved();
        tags[file.name].push({ ETag: etag, PartNumber: part.index + 1 });
      }
    });
    await Promise.all(lanes);
    tags[file.name].sort((a, b) => a.PartNumber - b.PartNumber);
  }
  await call("PUT", `/checkpoints/${created.checkpoint.id}`, { status: "Active", multi_parts_tags: tags });
  $("upload-text").textContent = `uploaded ${files.map((file) => file.name).join(", ")}`;
  await loadCheckpoints();
}

// --- endpoints ----------------------------------------------------------------------------

async function loadEndpoints() {
  const data = await call("GET", "/endpoints?limit=100");
  $("endpoint-rows").replaceChildren(
    ...data.endpoints.map((item) =>
      row([
        item.endpoint_name,
        item.endpoint_type,
        item.endpoint_status + (item.error ? `: ${item.error}` : ""),
        item.current_instance_count,
        item.min_instance_number,
        item.max_instance_number,
        item.autoscaling ? "yes" : "no",
      ]),
    ),
  );
}

// --- trainings ----------------------------------------------------------------------------

async function loadTrainings() {
  const data = await call("GET", "/trainings?limit=50");
  $("training-rows").replaceChildren(
    ...data.trainings.map((item) => {
      const progress = item.progress
        ? `epoch ${item.progress.epoch}/${item.progress.epochs}, loss ${item.progress.loss.toFixed(4)}`
        : "";
      return row([item.id, item.job_status, progress, item.lora_name || "", when(item.created)], () => showLoss(item));
    }),
  );
}

function showLoss(training) {
  const points = (training.info && training.info.loss_curve) || losses.get(training.id) || [];
  $("loss").hidden = false;
  const chart = $("loss-chart");
  chart.dataset.training = training.id;
  if (points.length < 2) {
    chart.innerHTML = `<text x="10" y="20">no loss values yet</text>`;
    return;
  }
  const steps = points.map((point) => point[0]);
  const values = points.map((point) => point[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...values), Math.max(...values)];
  const x = (step) => 30 + ((step - x0) / (x1 - x0 || 1)) * 360;
  const y = (loss) => 145 - ((loss - y0) / (y1 - y0 || 1)) * 130;
  const line = points.map(([step, loss]) => `${x(step).toFixed(1)},${y(loss).toFixed(1)}`).join(" ");
  chart.innerHTML =
    `<polyline points="${line}"></polyline>` +
    `<text x="2" y="18">${y1.toFixed(3)}</text><text x="2" y="148">${y0.toFixed(3)}</text>` +
    `<text x="30" y="158">step ${x0}</text><text x="330" y="158">step ${x1}</text>`;
}

// Loss values of running trainings, as they come, for their curves.
let trainingEvents = null;
function followTrainings() {
  if (trainingEvents) trainingEvents.abort();
  trainingEvents = new AbortController();
  follow(
    "/events?type=training.progress",
    (event) => {
      const points = losses.get(event.data.training_id) || [];
      points.push([event.data.step, event.data.loss]);
      losses.set(event.data.training_id, points);
      if ($("loss-chart").dataset.training === event.data.training_id) showLoss({ id: event.data.training_id });
      return false;
    },
    trainingEvents.signal,
  ).catch(() => {}); // a stream that broke off: the curves of finished trainings come from the server
}

// --- start --------------------------------------------------------------------------------

if (signedIn()) followTrainings();
signedInAs(signedIn());
