"""`cm3 serve`: text -> image and captioning over HTTP JSON, on Ray Serve, batched by the decode engine.

    POST /generate  {"prompt", "n", "seed", "guidance", "method", "temperature", "retrieved"} -> {"images", "seconds"}
    POST /caption   {"image": base64 PNG/JPEG, "question"?}                                    -> {"caption"}
    GET  /health    200 once the model is loaded

Two deployments: `CM3` is the FastAPI ingress, `CM3Model` holds the weights and the decode engine. The ingress
validates a request before it queues for the model, so a bad one costs no decoding and gets a 4xx naming its
field; good ones are batched by `ModelBatcher`, counted in images (a request of n images takes n of the engine's
rows), up to `max_batch_images` or `batch_wait_ms`, and the next batch forms when the model is free (see
serve_batcher.py for why not `@serve.batch`). The model replica receives one call per batch and returns uint8
pixels; PNG encoding and everything else per request stays out of its process.
Back-pressure: each ingress replica takes `max_ongoing_requests` at a time and Serve queues at most
`max_queued_requests` more, then answers 503; bodies over `max_body_bytes` get 413 before they are read whole.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`request: Request`) at runtime,
# from the functions Ray Serve rewrites, where a string annotation does not resolve.

import asyncio
import base64
import binascii
import io
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from cm3.workflows.serve_batcher import ModelBatcher
from cm3.workflows.serve_options import ServeOptions

APP_NAME = "cm3"
MAX_CAPTION_TOKENS = 32


class RequestError(Exception):
    """A bad request: HTTP status, the field at fault (None: the body) and what was expected."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field = status, field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    n: int = 1
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    guidance: float = Field(default=3.0, ge=0.0, le=100.0)
    method: Literal["top_p", "cd_k", "mix"] = "top_p"
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    retrieved: int = Field(default=0, ge=0)


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(min_length=1)
    question: str | None = None


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """The request model from a JSON body, or RequestError naming the first field at fault."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, None, f"the body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RequestError(400, None, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)  # strict: no "3" for 3, no true for 1 (a JSON integer is a fine float)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise RequestError(422, field, message) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (Content-Length or the stream itself)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"the body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, None, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image_field(text: str, size: int):
    """A base64 PNG or JPEG -> float tensor [1, 3, size, size] in [-1, 1] (cm3 ingest's center crop)."""
    from PIL import Image, UnidentifiedImageError

    from cm3.core.images import load_image_tensor

    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image", "not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(422, "image", f"does not decode as an image ({err})") from None
    if kind not in ("PNG", "JPEG"):
        raise RequestError(422, "image", f"expected a PNG or JPEG, got {kind}")
    try:
        return load_image_tensor(io.BytesIO(data), size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(422, "image", f"does not decode as an image ({err})") from None


def png_base64(image) -> str:
    """A uint8 tensor [3, H, W] as a base64 PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    picture = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    picture.save(buffer, format="PNG", compress_level=1)  # 0.6x the time of the default level, 1.1x the bytes
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class _Job:
    """A validated /generate request: its engine rows."""

    samples: list
    n: int


def _images_in_job(job: _Job) -> int:
    return job.n


def _error(err: RequestError) -> JSONResponse:
    # defined before the deployment classes: Serve pickles a class with the globals it sees at decoration time
    return JSONResponse({"error": str(err), "field": err.field}, status_code=err.status)


@serve.deployment(name="CM3Model")
class ImageModel:
    """One model replica: the checkpoint on its device and its decode engine. It runs whole batches formed by
    the HTTP ingress, so the process whose Python drives the decode loop does no per-request work."""

    def __init__(self, options: dict):
        import torch

        from cm3.model.checkpoint import load_checkpoint
        from cm3.model.engine import ImageEngine, ImageSample, quantize_int8
        from cm3.model.generation import text_to_image_prompt, unconditional_prompt
        from cm3.model.sampling import SamplingConfig

        options = ServeOptions(**options)
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        if device == "cpu":
            torch.set_num_threads(options.cpus_per_replica)
        self.model, self.tokenizer = load_checkpoint(options.checkpoint, device=device, dtype=dtype)
        if options.int8:
            quantize_int8(self.model)
        compile = device.startswith("cuda") if options.compile is None else options.compile
        self.engine = ImageEngine(self.model, self.tokenizer.vocab, unconditional_prompt(self.tokenizer.vocab),
                                  self.tokenizer.tokens_per_image, options.max_batch_images, compile=compile)
        self.lock = threading.Lock()  # one batch on the model at a time (CUDA graph capture needs that)
        warm_up = ImageSample(tuple(text_to_image_prompt(self.tokenizer, "warm up")), SamplingConfig(seed=0), 0)
        self.generate([[warm_up]])  # compile / capture before the replica reports healthy

    def describe(self) -> dict:
        return {"device": str(self.engine.device), "max_batch_images": self.engine.rows}

    def generate(self, rows: list) -> list:
        """uint8 images [n, 3, H, W] per request: one engine call for the whole batch, one VQ decode."""
        from cm3.core.images import to_uint8

        with self.lock:
            ids = self.engine.generate([sample for samples in rows for sample in samples])
            images = to_uint8(self.tokenizer.decode_image(ids.cpu()).float().cpu())
        return list(images.split([len(samples) for samples in rows]))

    def caption(self, image, question: str | None, max_new_tokens: int) -> str:
        from cm3.model.generation import caption_image

        with self.lock:
            return caption_image(self.model, self.tokenizer, image.to(self.engine.device), question=question,
                                 max_new_tokens=max_new_tokens)[0]


http = FastAPI(title="cm3", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="CM3")
@serve.ingress(http)
class CM3Service:
    """The HTTP routes of one replica: validation, tokenization and retrieval, batching, PNG encoding. The
    weights live in `ImageModel`; this process holds the tokenizer and the decoder's config only."""

    def __init__(self, options: dict, model):
        from cm3.model.checkpoint import load_tokenizer_and_config

        self.options = ServeOptions(**options)
        self.model_handle = model  # a DeploymentHandle to ImageModel
        self.config, self.tokenizer = load_tokenizer_and_config(self.options.checkpoint)
        self.rows, self.tokens = self.options.max_batch_images, self.tokenizer.tokens_per_image
        self.retriever = None
        if self.options.index:
            from cm3.index.query import Retriever

            self.retriever = Retriever(self.options.index)
        self.batcher = ModelBatcher(self._generate_batch, self.rows, self.options.batch_wait_ms / 1000,
                                    size_of=_images_in_job)

    @http.get("/health")
    async def health(self) -> dict:
        model = await self.model_handle.describe.remote()
        return {"status": "ok", "checkpoint": self.options.checkpoint, **model}

    @http.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            job = self._job(parse(GenerateRequest, await read_body(request, self.options.max_body_bytes)))
        except RequestError as err:
            return _error(err)
        images = await self.batcher.submit(job)
        pngs = await asyncio.to_thread(lambda: [png_base64(image) for image in images])
        return JSONResponse({"images": pngs, "seconds": time.perf_counter() - started})

    @http.post("/caption")
    async def caption(self, request: Request) -> JSONResponse:
        try:
            body = parse(CaptionRequest, await read_body(request, self.options.max_body_bytes))
            image = decode_image_field(body.image, self.tokenizer.vq.config.resolution)
            question = len(self.tokenizer.encode_caption(body.question)) if body.question else 0
            room = self.config.max_seq_len - (self.tokens + 2 + question)
            if room < 1:
                raise RequestError(422, "question", f"takes {question} tokens; the context leaves room for "
                                                    f"{question + room - 1}")
        except RequestError as err:
            return _error(err)
        caption = await self.model_handle.caption.remote(image, body.question, min(MAX_CAPTION_TOKENS, room))
        return JSONResponse({"caption": caption})

    async def _generate_batch(self, jobs: list[_Job]) -> list:
        return await self.model_handle.generate.remote([job.samples for job in jobs])

    def _job(self, request: GenerateRequest) -> _Job:
        """Engine rows for a request, or RequestError naming the field that cannot be served."""
        from cm3.model.engine import ImageSample
        from cm3.model.generation import seeded, text_to_image_prompt
        from cm3.model.sampling import SamplingConfig

        if not 1 <= request.n <= self.rows:
            raise RequestError(422, "n", f"must be between 1 and {self.rows} (this server's max_batch_images)")
        if request.retrieved and self.retriever is None:
            raise RequestError(422, "retrieved", "this server has no index (start it with --index)")
        if request.retrieved > self.options.max_retrieved:
            raise RequestError(422, "retrieved", f"must be at most {self.options.max_retrieved}")
        tokenizer = self.tokenizer
        docs = self.retriever.for_text(request.prompt, request.retrieved) if request.retrieved else []
        prompt = tuple(text_to_image_prompt(tokenizer, request.prompt, docs))
        room = self.config.max_seq_len - self.tokens + 1  # the engine's max_prompt_len()
        if len(prompt) > room:
            without_docs = len(text_to_image_prompt(tokenizer, request.prompt))
            field = "retrieved" if request.retrieved and without_docs <= room else "prompt"
            raise RequestError(422, field, f"the prompt takes {len(prompt)} tokens, the context leaves room for "
                                           f"{room} before the {self.tokens} image tokens")
        method = "top_p" if request.method == "mix" else request.method
        sampling = seeded(SamplingConfig(temperature=request.temperature, guidance_scale=request.guidance,
                                         method=method, seed=request.seed))
        mix = ["top_p"] * (request.n - request.n // 2) + ["cd_k"] * (request.n // 2)
        samples = [ImageSample(prompt, sampling, i, mix[i] if request.method == "mix" else None)
                   for i in range(request.n)]
        return _Job(samples, request.n)


def build_app(options: ServeOptions, gpus_per_replica: float):
    """The bound application: `replicas` ingress replicas (no reserved CPU) in front of as many model replicas,
    their resources and the back-pressure limits (on the ingress, where requests arrive)."""
    model = ImageModel.options(
        num_replicas=options.replicas,
        max_ongoing_requests=2,  # a batch decoding and a caption or the next batch waiting for the lock
        ray_actor_options={"num_gpus": gpus_per_replica,
                           "num_cpus": 0 if gpus_per_replica else options.cpus_per_replica},
    ).bind(asdict(options))
    return CM3Service.options(
        num_replicas=options.replicas,
        max_ongoing_requests=2 * options.max_batch_images + 4,  # a full batch decoding, the next one filling
        max_queued_requests=options.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(asdict(options), model)


def run(options: ServeOptions, stop: threading.Event, ready=None, on_connect=None) -> None:
    """Start (or join) Ray, deploy, serve until `stop` is set, then take down what this call started:
    the whole local Ray when it started one, else only its application. `on_connect` runs once Ray is up (Ray's
    driver replaces the process's SIGTERM handler: the command line installs its own again there); `ready` once
    the application serves."""
    import ray

    from cm3.workflows.ray_session import connect

    options.checkpoint = str(Path(options.checkpoint).resolve())
    owns_ray = options.ray_address is None and not ray.is_initialized()
    try:
        connect(options.ray_address, quiet=True, dashboard=False)  # a server needs no dashboard (slow to start)
        if on_connect is not None:
            on_connect()
        gpus = ray.cluster_resources().get("GPU", 0)
        if options.device == "auto":
            options.device = "cuda" if gpus >= 1 else "cpu"
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(build_app(options, 1 if options.device.startswith("cuda") else 0), name=APP_NAME,
                  route_prefix="/", blocking=False)
        if ready is not None:
            ready()
        stop.wait()
    finally:
        if ray.is_initialized():
            if owns_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        ray.shutdown()  # a local Ray started by connect() goes with it; a joined cluster is only disconnected
