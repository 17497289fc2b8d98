/* A prepared decode-size MoE layer call, from Python into the native layer (router.c,
   moekit_topk_layer_packed) in one C++ call: moekit.moe.native.TopKLayer's `fast` object.

   A decode step runs every other layer between two calls of the same layer, and their weights flush
   the caches. Each step of checking that the prepared call still applies, and of building its
   output, then misses on the interpreter's and torch's code and data: in Python, checking the
   guards (below) and building the call and its output took 100-120 us of a 0.3-0.4 ms one-token
   layer call, as long as reading a Mixtral-like expert. Here the same checks read a few fields (the
   tensors' C++ structs, the dicts' entries), and the output objects are filled in without a frame.

   The guards: what the call was prepared for, as it was then (any one that no longer holds answers
   None, and the caller prepares the call again or takes torch's path):
     - same:  (dict, key, value) triples: dict[key] is value (None: the key was missing), e.g. the
              layer's submodules, parameters, training flags and settings, the config's count of
              field assignments, the library's switches; dict None: the holder's own __dict__, given
              with each call (the holder keeps this call in its __dict__: holding that here would make
              a reference cycle, and a deleted model's weights would wait for the garbage collector);
     - sizes: (dict, size) pairs: e.g. the hook dicts, the layer's submodules;
     - pointers: (tensor, data pointer) pairs: the weights still live where the call reads them;
     - the input: a plain CPU float32 tensor (no tracer's or transform's), contiguous, of the
       prepared [T, D] shape;
     - autograd off, torch's thread count and this thread (the work memory is per thread).

   Entries:
     - call(holder, x): the holder's whole call -> its output object, where the call was prepared
       `direct` (the holder's own call does nothing but forward: no hooks, no compiled forward) and
       every guard holds; else None;
     - guards_hold(holder, x);
     - run(x): the kernel (the caller checked the guards) -> (out [T, D], the call's routing), or None
       where a logit is not finite.
   The routing object (native.KernelRouting) and the output object (moe.layer._NativeOutput) are made
   as their __init__ would make them: each slot named below set (the types' slot descriptors give
   their offsets), the rest None. Without this module (no C++ compiler or torch headers), TopKLayer
   checks the same guards in Python and calls the kernel by ctypes.

   Shape legend: T tokens, D model dim. */

#include <Python.h>
#include <structmember.h>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

typedef int (*layer_fn)(const float *x, float *out, const int64_t *args);

/* The routing object's slots, in order: its buffers, copied (False). */
const char *const ROUTING_SLOTS[] = {"_tensors", "_copied"};
/* The output object's slots set, in order: out, the holder, x, the routing object, top_k; every other
   slot named in OUTPUT_NONE is None. */
const char *const OUTPUT_SLOTS[] = {"output", "_layer", "_x", "_kernel_routing", "_top_k"};
const char *const OUTPUT_NONE[] = {"_routing", "_stats", "_router_logits", "_compute_losses", "_losses"};
constexpr int N_ROUTING = 2, N_OUTPUT = 5, N_NONE = 5;

struct Call {
    PyObject_HEAD
    vectorcallfunc vectorcall; /* the instance's call (tp_vectorcall_offset) */
    layer_fn fn;
    const int64_t *args;
    int64_t tokens, dim;
    int threads;
    unsigned long thread_id;
    PyObject *same;      /* tuple of (dict, key, value) */
    PyObject *sizes;     /* tuple of (dict, size) */
    PyObject *tensors;   /* tuple of tensors */
    PyObject *pointers;  /* tuple of ints, one per tensor */
    PyObject *outputs;   /* list of [T, D] tensors, popped one per call */
    PyObject *refill;    /* () -> a list of new outputs */
    PyObject *routing;   /* the routing objects' type */
    PyObject *buffers;   /* the routing's buffers */
    PyObject *output;    /* the output objects' type, or NULL: not direct */
    PyObject *top_k;     /* int */
    PyObject *last;      /* the last call's routing object, or NULL */
    Py_ssize_t routing_at[N_ROUTING], output_at[N_OUTPUT], none_at[N_NONE]; /* slot offsets */
};

/* The offset of `type`'s object slot `name`, or -1 with an exception set */
Py_ssize_t slot_offset(PyObject *type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(type, name);
    Py_ssize_t offset = -1;
    if (descr && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX)
        offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    else {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%R has no object slot %s", type, name);
    }
    Py_XDECREF(descr);
    return offset;
}

int slot_offsets(PyObject *type, const char *const *names, int n, Py_ssize_t *offsets)
{
    for (int i = 0; i < n; i++)
        if ((offsets[i] = slot_offset(type, names[i])) < 0) return -1;
    return 0;
}

/* A new instance of `type` (no __init__) with values[i] in slot offsets[i], and None in none[j] */
PyObject *filled(PyObject *type, const Py_ssize_t *offsets, PyObject *const *values, int n,
                 const Py_ssize_t *none = nullptr, int n_none = 0)
{
    PyObject *obj = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 0);
    if (!obj) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject **slot = (PyObject **)((char *)obj + offsets[i]);
        Py_XSETREF(*slot, Py_NewRef(values[i]));
    }
    for (int i = 0; i < n_none; i++) {
        PyObject **slot = (PyObject **)((char *)obj + none[i]);
        Py_XSETREF(*slot, Py_NewRef(Py_None));
    }
    return obj;
}

/* Whether x is what the call reads: a plain CPU float32 tensor [T, D], contiguous */
bool input_fits(Call *self, PyObject *x)
{
    if (!THPVariable_Check(x)) return false;
    const at::Tensor &t = THPVariable_Unpack(x);
    /* (a tensor of a tracer or transform, e.g. torch.export's fake or functional ones or vmap's
       batched ones, has one of these keys: its memory, if any, is not its values) */
    const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                      c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                      c10::DispatchKey::FuncTorchGradWrapper});
    return t.has_storage() && !t.key_set().has_any(traced) && t.device().is_cpu() && t.layout() == at::kStrided &&
           t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == self->tokens && t.size(1) == self->dim &&
           t.is_contiguous() && t.data_ptr() != nullptr;
}

/* 1 where every guard holds for `holder` and x, 0 where one does not, -1 with an exception set */
int guards_hold(Call *self, PyObject *holder, PyObject *x)
{
    if (at::GradMode::is_enabled() || !input_fits(self, x)) return 0;
    if (at::get_num_threads() != self->threads || PyThread_get_thread_ident() != self->thread_id) return 0;
    PyObject *holder_dict = PyObject_GenericGetDict(holder, NULL);
    if (!holder_dict) return -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->same); i++) {
        PyObject *triple = PyTuple_GET_ITEM(self->same, i), *dict = PyTuple_GET_ITEM(triple, 0);
        PyObject *value = PyDict_GetItemWithError(dict == Py_None ? holder_dict : dict, PyTuple_GET_ITEM(triple, 1));
        if ((value == NULL && PyErr_Occurred()) || (value ? value : Py_None) != PyTuple_GET_ITEM(triple, 2)) {
            Py_DECREF(holder_dict);
            return PyErr_Occurred() ? -1 : 0;
        }
    }
    Py_DECREF(holder_dict);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->sizes); i++) {
        PyObject *pair = PyTuple_GET_ITEM(self->sizes, i);
        if (PyDict_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) != PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1))) return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->tensors); i++) {
        PyObject *obj = PyTuple_GET_ITEM(self->tensors, i);
        if (!THPVariable_Check(obj)) return 0;
        void *ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(self->pointers, i));
        if (THPVariable_Unpack(obj).data_ptr() != ptr) return 0;
    }
    return 1;
}

/* The kernel on x (which the caller found to fit: input_fits) -> (out, its routing object) as new
   references (0), None where a logit was not finite (1), or -1 with an exception set */
int run_kernel(Call *self, PyObject *x, PyObject **out_obj, PyObject **routing_obj)
{
    /* the last call's routing, referenced elsewhere too (its output is alive): moved out of the
       buffers first. (A strong reference and its count, not a weak reference: one object fewer to
       make and clear per call.) */
    if (self->last && Py_REFCNT(self->last) > 1) {
        PyObject *done = PyObject_CallMethod(self->last, "tensors", NULL);
        if (!done) return -1;
        Py_DECREF(done);
    }
    Py_CLEAR(self->last);
    if (PyList_GET_SIZE(self->outputs) == 0) {
        PyObject *fresh = PyObject_CallNoArgs(self->refill);
        if (!fresh) return -1;
        if (!PyList_Check(fresh) || PyList_GET_SIZE(fresh) == 0) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_TypeError, "refill must give a non-empty list of output tensors");
            return -1;
        }
        Py_SETREF(self->outputs, fresh);
    }
    const Py_ssize_t n = PyList_GET_SIZE(self->outputs);
    PyObject *out = Py_NewRef(PyList_GET_ITEM(self->outputs, n - 1));
    if (PyList_SetSlice(self->outputs, n - 1, n, NULL) < 0) {
        Py_DECREF(out);
        return -1;
    }
    const float *x_ptr = (const float *)THPVariable_Unpack(x).data_ptr();
    float *out_ptr = (float *)THPVariable_Unpack(out).data_ptr();
    int status;
    Py_BEGIN_ALLOW_THREADS /* (as torch's ops and ctypes do: other Python threads run meanwhile) */
    status = self->fn(x_ptr, out_ptr, self->args);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        Py_DECREF(out);
        if (status == 1) return 1;
        PyErr_Format(PyExc_MemoryError, "the native expert kernel could not allocate its index arrays (%d)", status);
        return -1;
    }
    PyObject *slots[N_ROUTING] = {self->buffers, Py_False};
    PyObject *routing = filled(self->routing, self->routing_at, slots, N_ROUTING);
    if (!routing) {
        Py_DECREF(out);
        return -1;
    }
    self->last = Py_NewRef(routing);
    *out_obj = out;
    *routing_obj = routing;
    return 0;
}

/* A C++ exception (torch's checks throw c10::Error) must not cross into Python: it becomes a
   RuntimeError. */
#define CATCH_CXX(fail)                                  \
    catch (const std::exception &err)                    \
    {                                                    \
        PyErr_SetString(PyExc_RuntimeError, err.what()); \
        return fail;                                     \
    }

PyObject *call_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a prepared call takes its holder and the input tensor");
        return NULL;
    }
    try {
        Call *call = (Call *)self;
        PyObject *holder = args[0], *x = args[1];
        const int hold = call->output ? guards_hold(call, holder, x) : 0;
        if (hold <= 0) {
            if (hold < 0) return NULL;
            Py_RETURN_NONE;
        }
        PyObject *out, *routing;
        const int status = run_kernel(call, x, &out, &routing);
        if (status != 0) {
            if (status < 0) return NULL;
            Py_RETURN_NONE;
        }
        PyObject *slots[N_OUTPUT] = {out, holder, x, routing, call->top_k};
        PyObject *result = filled(call->output, call->output_at, slots, N_OUTPUT, call->none_at, N_NONE);
        Py_DECREF(out);
        Py_DECREF(routing);
        return result;
    }
    CATCH_CXX(NULL)
}

PyObject *call_run(PyObject *self, PyObject *x)
{
    try {
        if (!input_fits((Call *)self, x)) {
            PyErr_SetString(PyExc_ValueError, "the prepared call reads a plain CPU float32 tensor of its [T, D] shape");
            return NULL;
        }
        PyObject *out, *routing;
        const int status = run_kernel((Call *)self, x, &out, &routing);
        if (status != 0) {
            if (status < 0) return NULL;
            Py_RETURN_NONE;
        }
        PyObject *result = PyTuple_Pack(2, out, routing);
        Py_DECREF(out);
        Py_DECREF(routing);
        return result;
    }
    CATCH_CXX(NULL)
}

PyObject *call_guards_hold(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "guards_hold takes the holder and the input tensor");
        return NULL;
    }
    try {
        const int hold = guards_hold((Call *)self, args[0], args[1]);
        if (hold < 0) return NULL;
        return PyBool_FromLong(hold);
    }
    CATCH_CXX(NULL)
}

#define CALL_OBJECTS(apply)                                                                            \
    apply(same) apply(sizes) apply(tensors) apply(pointers) apply(outputs) apply(refill) apply(routing) \
        apply(buffers) apply(output) apply(top_k) apply(last)

int call_traverse(Call *self, visitproc visit, void *arg)
{
#define VISIT(field) Py_VISIT(self->field);
    CALL_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

int call_clear(Call *self)
{
#define CLEAR(field) Py_CLEAR(self->field);
    CALL_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

void call_dealloc(Call *self)
{
    PyObject_GC_UnTrack(self);
    call_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyMethodDef call_methods[] = {
    {"guards_hold", (PyCFunction)(void (*)(void))call_guards_hold, METH_FASTCALL,
     "guards_hold(holder, x): whether the call applies (its guards hold)."},
    {"run", call_run, METH_O, "-> (out, routing), or None where a logit is not finite; the guards unchecked."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CallType = {PyVarObject_HEAD_INIT(NULL, 0)};

/* Whether every item is a (dict, key, value) tuple (size 3; the dict may be None where `holder`) or a
   (dict, int) one (size 2); else False with a TypeError set */
bool check_tuples(PyObject *items, Py_ssize_t size, const char *what, bool holder)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != size ||
            !(PyDict_Check(PyTuple_GET_ITEM(item, 0)) || (holder && PyTuple_GET_ITEM(item, 0) == Py_None)) ||
            (size == 2 && !PyLong_Check(PyTuple_GET_ITEM(item, 1)))) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a %s tuple", what, i,
                         size == 3 ? "(dict or None, key, value)" : "(dict, int)");
            return false;
        }
    }
    return true;
}

/* Call(fn, args, tokens, dim, threads, thread_id, same, sizes, tensors, pointers, refill, routing,
   buffers, direct): fn and args are addresses (ints); direct: None, or (the output objects' type,
   top_k); the rest as in struct Call. */
PyObject *call_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    unsigned long long fn, packed, thread_id;
    long long tokens, dim;
    int threads;
    PyObject *same, *sizes, *tensors, *pointers, *refill, *routing, *buffers, *direct;
    if (!PyArg_ParseTuple(args, "KKLLiKO!O!O!O!OOO!O", &fn, &packed, &tokens, &dim, &threads, &thread_id,
                          &PyTuple_Type, &same, &PyTuple_Type, &sizes, &PyTuple_Type, &tensors, &PyTuple_Type,
                          &pointers, &refill, &routing, &PyTuple_Type, &buffers, &direct))
        return NULL;
    if (PyTuple_GET_SIZE(tensors) != PyTuple_GET_SIZE(pointers)) {
        PyErr_SetString(PyExc_ValueError, "tensors and pointers must be tuples of the same length");
        return NULL;
    }
    if (!check_tuples(same, 3, "same", true) || !check_tuples(sizes, 2, "sizes", false)) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pointers); i++)
        if (!PyLong_Check(PyTuple_GET_ITEM(pointers, i))) {
            PyErr_Format(PyExc_TypeError, "pointers[%zd] must be an int", i);
            return NULL;
        }
    if (!PyType_Check(routing)) {
        PyErr_SetString(PyExc_TypeError, "routing must be the routing objects' type");
        return NULL;
    }
    if (direct != Py_None && (!PyTuple_Check(direct) || PyTuple_GET_SIZE(direct) != 2 ||
                              !PyType_Check(PyTuple_GET_ITEM(direct, 0)))) {
        PyErr_SetString(PyExc_TypeError, "direct must be None or (the output objects' type, top_k)");
        return NULL;
    }
    Call *self = (Call *)type->tp_alloc(type, 0); /* (zeroed, and tracked by the garbage collector) */
    if (!self) return NULL;
    self->vectorcall = call_vectorcall;
    self->fn = (layer_fn)(uintptr_t)fn;
    self->args = (const int64_t *)(uintptr_t)packed;
    self->tokens = tokens;
    self->dim = dim;
    self->threads = threads;
    self->thread_id = (unsigned long)thread_id;
    self->same = Py_NewRef(same);
    self->sizes = Py_NewRef(sizes);
    self->tensors = Py_NewRef(tensors);
    self->pointers = Py_NewRef(pointers);
    self->refill = Py_NewRef(refill);
    self->routing = Py_NewRef(routing);
    self->buffers = Py_NewRef(buffers);
    self->outputs = PyList_New(0);
    if (!self->outputs || slot_offsets(routing, ROUTING_SLOTS, N_ROUTING, self->routing_at) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (direct != Py_None) {
        self->output = Py_NewRef(PyTuple_GET_ITEM(direct, 0));
        self->top_k = Py_NewRef(PyTuple_GET_ITEM(direct, 1));
        if (slot_offsets(self->output, OUTPUT_SLOTS, N_OUTPUT, self->output_at) < 0 ||
            slot_offsets(self->output, OUTPUT_NONE, N_NONE, self->none_at) < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

PyModuleDef module = {PyModuleDef_HEAD_INIT, "moekit_decode", "moekit's prepared decode-size layer call", -1, NULL};

} // namespace

PyMODINIT_FUNC PyInit_moekit_decode(void)
{
    CallType.tp_name = "moekit_decode.Call";
    CallType.tp_basicsize = sizeof(Call);
    CallType.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
    CallType.tp_doc = "A prepared decode-size MoE layer call (see decode.cpp).";
    CallType.tp_new = call_new;
    CallType.tp_dealloc = (destructor)call_dealloc;
    CallType.tp_free = PyObject_GC_Del;
    CallType.tp_traverse = (traverseproc)call_traverse;
    CallType.tp_clear = (inquiry)call_clear;
    CallType.tp_call = PyVectorcall_Call;
    CallType.tp_vectorcall_offset = offsetof(Call, vectorcall);
    CallType.tp_methods = call_methods;
    if (PyType_Ready(&CallType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&CallType);
    if (PyModule_AddObject(m, "Call", (PyObject *)&CallType) < 0) {
        Py_DECREF(&CallType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
