//! `#[dray::job(...)]`: turns an `async fn(ctx: &JobContext, input: T) -> Result<U, E>` into a
//! [`Job`](https://docs.rs/dray) named after the function, with its options checked at compile
//! time. Use it through the `dray` crate (feature `macros`, on by default).

#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{
    Error, Expr, ExprLit, FnArg, ItemFn, Lit, LitStr, Meta, MetaNameValue, ReturnType, Token, Type,
};

#[path = "../../dray-core/src/duration_grammar.rs"]
mod duration_grammar;

#[path = "../../dray-core/src/cron/grammar.rs"]
#[allow(dead_code)]
mod cron_grammar;

/// Declares a job from an async function.
///
/// ```ignore
/// #[dray::job(
///     timeout = "5m",
///     priority = "low",
///     retry(max_attempts = 3, backoff = "exponential", base = "1s", max = "5m", jitter),
///     idempotent,
///     queue = "exports",
/// )]
/// async fn export_users(ctx: &JobContext, input: ExportInput) -> Result<ExportOutput, JobError> {
///     ctx.progress(50, "halfway").await?;
///     Ok(ExportOutput { .. })
/// }
/// // Generates `pub struct ExportUsersJob;` implementing `dray::Job` with NAME "export_users":
/// // client.enqueue::<ExportUsersJob>(&input), Worker::register(ExportUsersJob).
/// // A function whose name already ends in `_job` (`cleanup_job`) gives `CleanupJob`.
/// ```
///
/// Options: `name = "..."` (default: the function's name), `queue = "..."`,
/// `timeout = "<duration>"`, `priority = "background|low|normal|high|critical"`,
/// `retry(max_attempts = N, backoff = "fixed|linear|exponential", base = "<duration>",
/// max = "<duration>", jitter = true|false)` (jitter is on unless `jitter = false`; a bare
/// `jitter` means true), `idempotent` or `unique` (one unfinished job per input), or
/// `unique(key = "field")` (one unfinished job per value of `input.field`).
#[proc_macro_attribute]
pub fn job(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as Args);
    let func = syn::parse_macro_input!(item as ItemFn);
    let original = quote!(#func);
    match expand(args, func) {
        Ok(ts) => ts.into(),
        // Keep the function, so the only error the user sees is the one about the attribute.
        Err(e) => {
            let mut ts = e.to_compile_error();
            ts.extend(original);
            ts.into()
        }
    }
}

struct Args(Punctuated<Meta, Token![,]>);

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        Ok(Args(Punctuated::parse_terminated(input)?))
    }
}

fn lit_str(meta: &Meta) -> syn::Result<LitStr> {
    match meta {
        Meta::NameValue(nv) => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Ok(s.clone()),
            other => Err(Error::new_spanned(
                other,
                "expected a string literal, e.g. \"5m\"",
            )),
        },
        other => Err(Error::new_spanned(other, "expected `name = \"value\"`")),
    }
}

fn duration(meta: &Meta) -> syn::Result<proc_macro2::TokenStream> {
    let s = lit_str(meta)?;
    let d = duration_grammar::parse(&s.value()).map_err(|why| Error::new_spanned(&s, why))?;
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    Ok(quote!(::std::time::Duration::new(#secs, #nanos)))
}

/// A switch: `what` alone (true), or `what = true | false`.
fn flag(meta: &Meta, what: &str) -> syn::Result<bool> {
    match meta {
        Meta::Path(_) => Ok(true),
        Meta::NameValue(MetaNameValue {
            value: Expr::Lit(ExprLit {
                lit: Lit::Bool(b), ..
            }),
            ..
        }) => Ok(b.value),
        other => Err(Error::new_spanned(
            other,
            format!("{what} is `{what}`, `{what} = true` or `{what} = false`"),
        )),
    }
}

/// `what = N` with a whole number N of at least 1.
fn at_least_one(meta: &Meta, what: &str, example: &str) -> syn::Result<i32> {
    let Meta::NameValue(nv) = meta else {
        return Err(Error::new_spanned(
            meta,
            format!("write {what} = {example}"),
        ));
    };
    let n: i32 = match &nv.value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.base10_parse()?,
        other => {
            return Err(Error::new_spanned(
                other,
                format!("{what} is a whole number, at least 1"),
            ));
        }
    };
    if n < 1 {
        return Err(Error::new_spanned(
            &nv.value,
            format!("{what} is at least 1"),
        ));
    }
    Ok(n)
}

fn path_name(meta: &Meta) -> String {
    meta.path()
        .get_ident()
        .map(|i| i.to_string())
        .unwrap_or_default()
}

/// `Result<T, …>` / `Result<T>` → `T`.
fn output_type(ret: &ReturnType) -> syn::Result<Type> {
    let ReturnType::Type(_, ty) = ret else {
        return Err(Error::new(
            Span::call_site(),
            "a job returns Result<Output, JobError>",
        ));
    };
    if let Type::Path(p) = &**ty
        && let Some(last) = p.path.segments.last()
        && last.ident == "Result"
        && let syn::PathArguments::AngleBracketed(args) = &last.arguments
        && let Some(syn::GenericArgument::Type(t)) = args.args.first()
    {
        return Ok(t.clone());
    }
    Err(Error::new_spanned(
        ty,
        "a job returns Result<Output, JobError> (or another error type that converts into JobError)",
    ))
}

fn pascal(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The options jobs and workflows share (their option structs have the same fields): `name`,
/// `queue`, `timeout`, `priority` and `retry(...)`. Answers false for any other option.
fn common_option(
    meta: &Meta,
    opts: &mut Vec<proc_macro2::TokenStream>,
    name: &mut String,
) -> syn::Result<bool> {
    match path_name(meta).as_str() {
        "name" => *name = lit_str(meta)?.value(),
        "queue" => {
            let q = lit_str(meta)?;
            let v = q.value();
            if v.is_empty()
                || v.len() > 128
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
            {
                return Err(Error::new_spanned(
                    q,
                    "a queue name is 1-128 characters from A-Z a-z 0-9 _ . : -",
                ));
            }
            opts.push(quote!(o.queue = ::std::string::String::from(#v);));
        }
        "timeout" => {
            let d = duration(meta)?;
            opts.push(quote!(o.timeout = ::std::option::Option::Some(#d);));
        }
        "priority" => {
            let p = lit_str(meta)?;
            let level = match p.value().as_str() {
                "background" => quote!(BACKGROUND),
                "low" => quote!(LOW),
                "normal" => quote!(NORMAL),
                "high" => quote!(HIGH),
                "critical" => quote!(CRITICAL),
                _ => {
                    return Err(Error::new_spanned(
                        p,
                        "priority is one of background, low, normal, high, critical",
                    ));
                }
            };
            opts.push(quote!(o.priority = ::dray::Priority::#level;));
        }
        "retry" => {
            let Meta::List(list) = meta else {
                return Err(Error::new_spanned(
                    meta,
                    "write retry(max_attempts = 3, backoff = \"exponential\", ...)",
                ));
            };
            let inner: Args = list.parse_args()?;
            for m in &inner.0 {
                match path_name(m).as_str() {
                    "max_attempts" => {
                        let n = at_least_one(m, "max_attempts", "3")?;
                        opts.push(quote!(o.retry.max_attempts = #n;));
                    }
                    "backoff" => {
                        let b = lit_str(m)?;
                        let v = match b.value().as_str() {
                            "fixed" => quote!(Fixed),
                            "linear" => quote!(Linear),
                            "exponential" => quote!(Exponential),
                            _ => {
                                return Err(Error::new_spanned(
                                    b,
                                    "backoff is one of fixed, linear, exponential",
                                ));
                            }
                        };
                        opts.push(quote!(o.retry.backoff = ::dray::Backoff::#v;));
                    }
                    "base" => {
                        let d = duration(m)?;
                        opts.push(quote!(o.retry.base = #d;));
                    }
                    "max" => {
                        let d = duration(m)?;
                        opts.push(quote!(o.retry.max = #d;));
                    }
                    "jitter" => {
                        let on = flag(m, "jitter")?;
                        opts.push(quote!(o.retry.jitter = #on;))
                    }
                    _ => {
                        return Err(Error::new_spanned(
                            m,
                            "retry takes max_attempts, backoff, base, max and jitter",
                        ));
                    }
                }
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn expand(args: Args, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if func.sig.asyncness.is_none() {
        return Err(Error::new_spanned(
            func.sig.fn_token,
            "#[dray::job] goes on an `async fn`",
        ));
    }
    let params: Vec<&FnArg> = func.sig.inputs.iter().collect();
    let input_ty = match params.as_slice() {
        [_ctx, FnArg::Typed(input)] => (*input.ty).clone(),
        _ => {
            return Err(Error::new_spanned(
                &func.sig.inputs,
                "a job takes exactly (ctx: &JobContext, input: YourInput)",
            ));
        }
    };
    let output_ty = output_type(&func.sig.output)?;
    let fn_name = &func.sig.ident;
    let vis = &func.vis;
    let mut name = fn_name.to_string();
    // `resize` makes `ResizeJob`; a function already named `…_job` is not suffixed twice.
    let struct_name = if name.ends_with("_job") {
        format_ident!("{}", pascal(&name))
    } else {
        format_ident!("{}Job", pascal(&name))
    };

    let mut opts = Vec::new();
    let mut key_fn = quote!();
    for meta in &args.0 {
        if common_option(meta, &mut opts, &mut name)? {
            continue;
        }
        match path_name(meta).as_str() {
            "idempotent" | "unique" if matches!(meta, Meta::Path(_)) => {
                opts.push(quote!(o.unique = true;))
            }
            "unique" => {
                let Meta::List(list) = meta else {
                    return Err(Error::new_spanned(
                        meta,
                        "write `unique` or `unique(key = \"field\")`",
                    ));
                };
                let inner: Args = list.parse_args()?;
                let mut field = None;
                for m in &inner.0 {
                    match path_name(m).as_str() {
                        "key" => field = Some(lit_str(m)?),
                        _ => return Err(Error::new_spanned(m, "unique takes `key = \"field\"`")),
                    }
                }
                let field = field.ok_or_else(|| {
                    Error::new_spanned(list, "unique(...) needs `key = \"field\"`")
                })?;
                let ident = syn::Ident::new(&field.value(), field.span());
                key_fn = quote! {
                    fn key(input: &Self::Input) -> ::std::option::Option<::std::string::String> {
                        ::std::option::Option::Some(::std::string::ToString::to_string(&input.#ident))
                    }
                };
            }
            _ => {
                return Err(Error::new_spanned(
                    meta,
                    "unknown #[dray::job] option; use name, queue, timeout, priority, retry(...), idempotent, unique",
                ));
            }
        }
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        || name.is_empty()
    {
        return Err(Error::new(
            Span::call_site(),
            "a job name is 1-256 characters from A-Z a-z 0-9 _ . : -",
        ));
    }
    let doc = format!("The job `{name}`, declared by `#[dray::job]` on [`{fn_name}`].");
    Ok(quote! {
        #func

        #[doc = #doc]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #struct_name;

        impl ::dray::Job for #struct_name {
            const NAME: &'static str = #name;
            type Input = #input_ty;
            type Output = #output_ty;

            fn options() -> ::dray::JobOptions {
                #[allow(unused_mut)]
                let mut o = ::dray::JobOptions::default();
                #(#opts)*
                o
            }

            #key_fn

            // `?` converts the handler's error type into JobError (a no-op when it already is).
            #[allow(clippy::needless_question_mark)]
            async fn run(
                &self,
                ctx: &::dray::JobContext,
                input: Self::Input,
            ) -> ::std::result::Result<Self::Output, ::dray::JobError> {
                ::std::result::Result::Ok(#fn_name(ctx, input).await?)
            }
        }
    })
}

/// Declares a durable workflow from an async function.
///
/// ```ignore
/// #[dray::workflow(name = "verify_account", version = 1, timeout = "48h")]
/// async fn verify_account(ctx: &WorkflowContext, user: UserId) -> Result<Verified, WorkflowError> {
///     let token = ctx.step("make_token", || async { Ok(new_token()) }).await?;
///     ctx.sleep(Duration::from_secs(24 * 3600)).await?;
///     Ok(Verified { token })
/// }
/// // Generates `pub struct VerifyAccountWorkflow;` implementing `dray::Workflow`:
/// // client.start_workflow::<VerifyAccountWorkflow>(&user, "verify-42"),
/// // Worker::register_workflow(VerifyAccountWorkflow).
/// ```
///
/// Options: `name = "..."` (default: the function's name), `version = N` (default 1; at least
/// 1), `timeout = "<duration>"` (the whole run's), `queue = "..."`,
/// `priority = "background|low|normal|high|critical"`, and `retry(...)` as for `#[dray::job]`
/// (retries of the run after transient failures).
#[proc_macro_attribute]
pub fn workflow(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as Args);
    let func = syn::parse_macro_input!(item as ItemFn);
    let original = quote!(#func);
    match expand_workflow(args, func) {
        Ok(ts) => ts.into(),
        Err(e) => {
            let mut ts = e.to_compile_error();
            ts.extend(original);
            ts.into()
        }
    }
}

fn expand_workflow(args: Args, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if func.sig.asyncness.is_none() {
        return Err(Error::new_spanned(
            func.sig.fn_token,
            "#[dray::workflow] goes on an `async fn`",
        ));
    }
    let params: Vec<&FnArg> = func.sig.inputs.iter().collect();
    let input_ty = match params.as_slice() {
        [_ctx, FnArg::Typed(input)] => (*input.ty).clone(),
        _ => {
            return Err(Error::new_spanned(
                &func.sig.inputs,
                "a workflow takes exactly (ctx: &WorkflowContext, input: YourInput)",
            ));
        }
    };
    let output_ty = output_type(&func.sig.output)
        .map_err(|e| Error::new(e.span(), "a workflow returns Result<Output, WorkflowError>"))?;
    let fn_name = &func.sig.ident;
    let vis = &func.vis;
    let mut name = fn_name.to_string();
    let struct_name = if name.ends_with("_workflow") {
        format_ident!("{}", pascal(&name))
    } else {
        format_ident!("{}Workflow", pascal(&name))
    };
    let mut opts = Vec::new();
    let mut version = 1i32;
    for meta in &args.0 {
        if common_option(meta, &mut opts, &mut name)? {
            continue;
        }
        match path_name(meta).as_str() {
            "version" => version = at_least_one(meta, "version", "2")?,
            _ => {
                return Err(Error::new_spanned(
                    meta,
                    "unknown #[dray::workflow] option; use name, version, timeout, queue, priority, retry(...)",
                ));
            }
        }
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        return Err(Error::new(
            Span::call_site(),
            "a workflow name is 1-256 characters from A-Z a-z 0-9 _ . : -",
        ));
    }
    let doc = format!(
        "The workflow `{name}` (version {version}), declared by `#[dray::workflow]` on [`{fn_name}`]."
    );
    Ok(quote! {
        #func

        #[doc = #doc]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #struct_name;

        impl ::dray::Workflow for #struct_name {
            const NAME: &'static str = #name;
            const VERSION: i32 = #version;
            type Input = #input_ty;
            type Output = #output_ty;

            fn options() -> ::dray::WorkflowOptions {
                #[allow(unused_mut)]
                let mut o = ::dray::WorkflowOptions::default();
                #(#opts)*
                o
            }

            #[allow(clippy::needless_question_mark)]
            async fn run(
                &self,
                ctx: &::dray::WorkflowContext,
                input: Self::Input,
            ) -> ::std::result::Result<Self::Output, ::dray::WorkflowError> {
                ::std::result::Result::Ok(#fn_name(ctx, input).await?)
            }
        }
    })
}

/// Declares a cron schedule and its handler from an async function (Forge's
/// `#[forge::cron]`).
///
/// ```ignore
/// #[dray::cron("0 9 * * MON-FRI", timezone = "America/New_York", catch_up, catch_up_limit = 3,
///              overlap = "skip")]
/// async fn morning_report(ctx: &CronContext) -> Result<(), JobError> {
///     tracing::info!(late = ctx.is_late(), "report for {}", ctx.scheduled_at());
///     Ok(())
/// }
/// // Generates `pub struct MorningReportCron;` implementing `dray::Cron`:
/// // Worker::register_cron(MorningReportCron).
/// ```
///
/// The expression comes first: five fields, or six with a leading seconds field, month and
/// weekday names, `L`, `W`, `#`, or an alias (`@hourly`, `@daily`, `@weekly`, `@monthly`,
/// `@yearly`). Options: `timezone = "IANA/Name"` (default UTC), `catch_up` (run missed ticks
/// after downtime), `catch_up_limit = N` (default 1), `overlap = "skip" | "allow"` (default
/// skip), `name = "..."` (default: the function's name), and the job options `queue`,
/// `timeout`, `priority`, `retry(...)` as for `#[dray::job]`. A bad expression or zone is a
/// compile error naming the field.
#[proc_macro_attribute]
pub fn cron(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as CronArgs);
    let func = syn::parse_macro_input!(item as ItemFn);
    let original = quote!(#func);
    match expand_cron(args, func) {
        Ok(ts) => ts.into(),
        Err(e) => {
            let mut ts = e.to_compile_error();
            ts.extend(original);
            ts.into()
        }
    }
}

struct CronArgs {
    expression: LitStr,
    options: Punctuated<Meta, Token![,]>,
}

impl Parse for CronArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let expression: LitStr = input.parse().map_err(|e| {
            Error::new(
                e.span(),
                "#[dray::cron] starts with the expression, e.g. #[dray::cron(\"0 9 * * MON-FRI\")]",
            )
        })?;
        let options = if input.is_empty() {
            Punctuated::new()
        } else {
            input.parse::<Token![,]>()?;
            Punctuated::parse_terminated(input)?
        };
        Ok(CronArgs {
            expression,
            options,
        })
    }
}

fn expand_cron(args: CronArgs, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if func.sig.asyncness.is_none() {
        return Err(Error::new_spanned(
            func.sig.fn_token,
            "#[dray::cron] goes on an `async fn`",
        ));
    }
    if func.sig.inputs.len() != 1 {
        return Err(Error::new_spanned(
            &func.sig.inputs,
            "a cron handler takes exactly (ctx: &CronContext)",
        ));
    }
    let expr = args.expression.value();
    cron_grammar::parse_expression(&expr)
        .map_err(|why| Error::new_spanned(&args.expression, why))?;
    let fn_name = &func.sig.ident;
    let vis = &func.vis;
    let mut name = fn_name.to_string();
    let struct_name = if name.ends_with("_cron") {
        format_ident!("{}", pascal(&name))
    } else {
        format_ident!("{}Cron", pascal(&name))
    };
    let mut opts = Vec::new();
    let mut zone = String::from("UTC");
    let mut cron_opts = Vec::new();
    for meta in &args.options {
        if common_option(meta, &mut opts, &mut name)? {
            continue;
        }
        match path_name(meta).as_str() {
            "timezone" => {
                let z = lit_str(meta)?;
                cron_grammar::parse_zone(&z.value()).map_err(|why| Error::new_spanned(&z, why))?;
                zone = z.value();
            }
            "catch_up" => {
                let on = flag(meta, "catch_up")?;
                cron_opts.push(quote!(c.catch_up = #on;));
            }
            "catch_up_limit" => {
                let n = at_least_one(meta, "catch_up_limit", "3")? as u32;
                if n > 1000 {
                    return Err(Error::new_spanned(meta, "catch_up_limit is at most 1000"));
                }
                cron_opts.push(quote!(c.catch_up_limit = #n;));
            }
            "overlap" => {
                let o = lit_str(meta)?;
                let v = match o.value().as_str() {
                    "skip" => quote!(Skip),
                    "allow" => quote!(Allow),
                    _ => return Err(Error::new_spanned(o, "overlap is \"skip\" or \"allow\"")),
                };
                cron_opts.push(quote!(c.overlap = ::dray::Overlap::#v;));
            }
            _ => {
                return Err(Error::new_spanned(
                    meta,
                    "unknown #[dray::cron] option; use timezone, catch_up, catch_up_limit, overlap, name, queue, timeout, priority, retry(...)",
                ));
            }
        }
    }
    if name.is_empty()
        || name.len() > 200
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
    {
        return Err(Error::new(
            Span::call_site(),
            "a schedule name is 1-200 characters from A-Z a-z 0-9 _ . : -",
        ));
    }
    let doc = format!(
        "The cron schedule `{name}` ({expr:?} in {zone}), declared by `#[dray::cron]` on [`{fn_name}`]."
    );
    Ok(quote! {
        #func

        #[doc = #doc]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #struct_name;

        impl ::dray::Cron for #struct_name {
            const NAME: &'static str = #name;

            fn options() -> ::dray::CronOptions {
                let mut c = ::dray::CronOptions::new(#expr);
                c.timezone = ::std::string::String::from(#zone);
                #(#cron_opts)*
                #[allow(unused_mut)]
                let mut o = c.job;
                #(#opts)*
                c.job = o;
                c
            }

            #[allow(clippy::needless_question_mark)]
            async fn run(
                &self,
                ctx: &::dray::CronContext,
            ) -> ::std::result::Result<(), ::dray::JobError> {
                ::std::result::Result::Ok(#fn_name(ctx).await?)
            }
        }
    })
}
